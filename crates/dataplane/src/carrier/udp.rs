//! IP-in-UDP: the inner packet is the whole UDP payload.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::Received;

/// One socket receives on the carrier port; a pool of sockets on ephemeral ports sends, one
/// chosen per flow by hash, so the outer source port is a function of the inner 5-tuple.
#[derive(Debug)]
pub struct UdpCarrier {
    rx: UdpSocket,
    tx: Vec<UdpSocket>,
    port: u16,
}

fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    super::tune_socket(&sock)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

impl UdpCarrier {
    pub fn open(listen: SocketAddr, source_ports: usize) -> io::Result<Self> {
        let rx = bind(listen)?;
        let tx = (0..source_ports.max(1)).map(|_| bind(SocketAddr::new(listen.ip(), 0))).collect::<io::Result<_>>()?;
        Ok(UdpCarrier { rx, tx, port: listen.port() })
    }

    pub(super) async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let (n, from) = self.rx.recv_from(buf).await?;
        Ok(Received { from: from.ip(), inner: 0..n })
    }

    pub(super) async fn send(&self, to: IpAddr, flow_hash: u64, inner: &[u8]) -> io::Result<()> {
        let len = self.tx.len() as u64;
        let i = usize::try_from(flow_hash % len).unwrap_or(0);
        self.tx[i].send_to(inner, SocketAddr::new(to, self.port)).await.map(drop)
    }
}
