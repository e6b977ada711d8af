//! IP-in-UDP: the inner packet is the whole UDP payload.
//!
//! Batched both ways through quinn-udp: a run of equal-sized inner packets to one peer leaves
//! in one `sendmsg` with UDP GSO (the kernel cuts it into datagrams), and one `recvmsg` with
//! UDP GRO returns several datagrams of one sender back to back, `stride` bytes apart.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::Received;

/// One socket receives on the carrier port; a pool of sockets on ephemeral ports sends, one
/// chosen per flow by hash, so the outer source port is a function of the inner 5-tuple.
#[derive(Debug)]
pub struct UdpCarrier {
    rx: (UdpSocket, UdpSocketState),
    tx: Vec<(UdpSocket, UdpSocketState)>,
    /// The local port of each `tx` socket: a flow's outer source port.
    tx_ports: Vec<u16>,
    port: u16,
}

fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, UdpSocketState)> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    // quinn-udp turns on GRO and sets its own path-MTU mode; ours (never fragment) goes last.
    let state = UdpSocketState::new((&sock).into())?;
    super::tune_socket(&sock)?;
    Ok((UdpSocket::from_std(sock.into())?, state))
}

impl UdpCarrier {
    pub fn open(listen: SocketAddr, source_ports: usize) -> io::Result<Self> {
        let rx = bind(listen)?;
        let tx: Vec<_> =
            (0..source_ports.max(1)).map(|_| bind(SocketAddr::new(listen.ip(), 0))).collect::<io::Result<_>>()?;
        let tx_ports = tx.iter().map(|(s, _)| s.local_addr().map(|a| a.port())).collect::<io::Result<_>>()?;
        Ok(UdpCarrier { rx, tx, tx_ports, port: listen.port() })
    }

    fn sender(&self, flow_hash: u64) -> usize {
        usize::try_from(flow_hash % self.tx.len() as u64).unwrap_or(0)
    }

    /// The outer source port of a flow's packets (a flow always leaves by the same socket).
    pub fn source_port_for(&self, flow_hash: u64) -> u16 {
        self.tx_ports[self.sender(flow_hash)]
    }

    /// The carrier's port, on every node.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Most inner packets one [`UdpCarrier::send`] may carry.
    pub fn max_batch(&self) -> usize {
        self.tx.first().map_or(1, |(_, s)| s.max_gso_segments())
    }

    /// Turns off receive offload (UDP GRO) on the carrier socket. With it on, a NIC's GRO merges
    /// a flow's carrier datagrams into one train before the kernel fast path sees them, and the
    /// program can only leave such a train to the daemon: the flow's packets would take two paths
    /// and arrive out of order. The cost: the daemon reads its carrier packets one at a time.
    pub(super) fn disable_receive_offload(&self) -> io::Result<()> {
        super::set_int_option(self.receive_socket(), libc::SOL_UDP, libc::UDP_GRO, 0)
    }

    pub(super) fn receive_socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.rx.0)
    }

    pub(super) async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let (sock, state) = &self.rx;
        let mut meta = [RecvMeta::default()];
        sock.async_io(Interest::READABLE, || state.recv(sock.into(), &mut [IoSliceMut::new(buf)], &mut meta)).await?;
        let m = &meta[0];
        Ok(Received { from: m.addr.ip(), inner: 0..m.len, stride: m.stride.max(1) })
    }

    pub(super) fn try_recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let (sock, state) = &self.rx;
        let mut meta = [RecvMeta::default()];
        sock.try_io(Interest::READABLE, || state.recv(sock.into(), &mut [IoSliceMut::new(buf)], &mut meta))?;
        let m = &meta[0];
        Ok(Received { from: m.addr.ip(), inner: 0..m.len, stride: m.stride.max(1) })
    }

    /// Sends `contents`: inner packets of `segment` bytes each (the last may be shorter).
    pub(super) async fn send(&self, to: IpAddr, flow_hash: u64, contents: &[u8], segment: usize) -> io::Result<()> {
        let (sock, state) = &self.tx[self.sender(flow_hash)];
        let transmit = Transmit {
            destination: SocketAddr::new(to, self.port),
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        sock.async_io(Interest::WRITABLE, || state.try_send(sock.into(), &transmit)).await
    }
}
