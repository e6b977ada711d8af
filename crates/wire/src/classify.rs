//! Classification of inner IP packets into flow keys.

use std::net::IpAddr;

use etherparse::err::packet::SliceError;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The 5-tuple that names a flow, as seen from the client (source = client).
///
/// Addresses are [`IpAddr`] so that IPv6 VIPs fit later without a new key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

impl FlowKey {
    /// A hash of the 5-tuple that is the same on every node and every run.
    ///
    /// Used where nodes must agree without talking (consistent hashing, the carrier's outer
    /// source port), so it is a fixed function, not a per-process keyed hasher.
    pub fn stable_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                eat(&s.octets());
                eat(&d.octets());
            }
            (s, d) => {
                eat(&to_v6(s));
                eat(&to_v6(d));
            }
        }
        eat(&self.src_port.to_be_bytes());
        eat(&self.dst_port.to_be_bytes());
        eat(&[self.proto]);
        mix64(h)
    }
}

fn to_v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// SplitMix64's finaliser: spreads a hash's weak low bits over the whole word.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The TCP flags the flow table cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// Transport-layer facts of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp(TcpFlags),
    Udp,
    /// ICMP carries no ports; its key has ports 0. An error (destination unreachable, e.g.
    /// "fragmentation needed"; time exceeded; parameter problem) about a packet the VIP sent
    /// names that packet's flow, as seen from the client.
    Icmp {
        error_for: Option<FlowKey>,
    },
}

/// What ringlb needs to know about one inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    pub key: FlowKey,
    pub l4: L4,
}

impl PacketMeta {
    /// A TCP SYN without ACK: the first packet of a connection.
    pub fn is_tcp_syn(&self) -> bool {
        matches!(self.l4, L4::Tcp(f) if f.syn && !f.ack)
    }
}

/// Why a packet could not be classified. Each maps to a drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum MalformedReason {
    #[error("packet shorter than its headers say")]
    Truncated,
    #[error("bad ip header (version, ihl, total length or checksum)")]
    BadIpHeader,
    #[error("bad transport header")]
    BadTransportHeader,
    #[error("ip fragment")]
    Fragment,
    #[error("transport protocol not balanced")]
    UnsupportedProtocol,
}

/// The flow of the IPv4 packet an ICMP error quotes (its header and at least 8 bytes), turned
/// around: the quoted packet went from the VIP to the client, the flow is keyed client first.
fn quoted_flow(quoted: &[u8]) -> Option<FlowKey> {
    let ihl = usize::from(*quoted.first()? & 0x0f) * 4;
    if quoted[0] >> 4 != 4 || ihl < 20 || quoted.len() < ihl + 4 {
        return None;
    }
    let proto = quoted[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let addr =
        |at: usize| IpAddr::V4(std::net::Ipv4Addr::new(quoted[at], quoted[at + 1], quoted[at + 2], quoted[at + 3]));
    let port = |at: usize| u16::from_be_bytes([quoted[at], quoted[at + 1]]);
    Some(FlowKey { src: addr(16), dst: addr(12), src_port: port(ihl + 2), dst_port: port(ihl), proto })
}

/// Parses an inner IP packet (no link header) into its flow key.
///
/// Checks what the kernel checks before it would deliver the packet (IPv4 header checksum,
/// lengths), so that nothing ringlb forwards can be refused later for a reason it could have
/// seen here. Fragments are refused: ringlb never depends on IP fragmentation.
pub fn classify(pkt: &[u8]) -> Result<PacketMeta, MalformedReason> {
    let sliced = SlicedPacket::from_ip(pkt).map_err(|e| match e {
        SliceError::Len(_) => MalformedReason::Truncated,
        SliceError::Tcp(_) => MalformedReason::BadTransportHeader,
        _ => MalformedReason::BadIpHeader,
    })?;
    let (src, dst) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            if crate::checksum::finish(crate::checksum::add(0, h.slice())) != 0 {
                return Err(MalformedReason::BadIpHeader);
            }
            if h.is_fragmenting_payload() {
                return Err(MalformedReason::Fragment);
            }
            (IpAddr::V4(h.source_addr()), IpAddr::V4(h.destination_addr()))
        }
        Some(NetSlice::Ipv6(v6)) => {
            if v6.is_payload_fragmented() {
                return Err(MalformedReason::Fragment);
            }
            let h = v6.header();
            (IpAddr::V6(h.source_addr()), IpAddr::V6(h.destination_addr()))
        }
        _ => return Err(MalformedReason::BadIpHeader),
    };
    let (src_port, dst_port, proto, l4) = match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let flags = TcpFlags { syn: t.syn(), ack: t.ack(), fin: t.fin(), rst: t.rst() };
            (t.source_port(), t.destination_port(), IPPROTO_TCP, L4::Tcp(flags))
        }
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port(), IPPROTO_UDP, L4::Udp),
        Some(TransportSlice::Icmpv4(icmp)) => {
            let error_for = matches!(icmp.type_u8(), 3 | 11 | 12).then(|| quoted_flow(icmp.payload())).flatten();
            (0, 0, IPPROTO_ICMP, L4::Icmp { error_for })
        }
        _ => return Err(MalformedReason::UnsupportedProtocol),
    };
    Ok(PacketMeta { key: FlowKey { src, dst, src_port, dst_port, proto }, l4 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{tcp_v4, udp_v4};

    fn check(pkt: &[u8], want: Result<(u8, u16, u16), MalformedReason>) {
        let got = classify(pkt).map(|m| (m.key.proto, m.key.src_port, m.key.dst_port));
        assert_eq!(got, want, "packet {pkt:02x?}");
    }

    #[test]
    fn classifies_and_refuses() {
        let tcp = tcp_v4([10, 0, 0, 1], [10, 200, 0, 10], 40000, 80, 0x02, &[]);
        check(&tcp, Ok((IPPROTO_TCP, 40000, 80)));
        let udp = udp_v4([10, 0, 0, 1], [10, 200, 0, 10], 5353, 53, b"hi");
        check(&udp, Ok((IPPROTO_UDP, 5353, 53)));

        check(&tcp[..10], Err(MalformedReason::Truncated));
        check(&tcp[..30], Err(MalformedReason::Truncated));
        check(&[], Err(MalformedReason::Truncated));

        let mut bad_ihl = tcp.clone();
        bad_ihl[0] = 0x43;
        check(&bad_ihl, Err(MalformedReason::BadIpHeader));

        let mut long = tcp.clone();
        long[2..4].copy_from_slice(&2000u16.to_be_bytes());
        assert!(classify(&long).is_err());

        let mut bad_sum = tcp.clone();
        bad_sum[10] ^= 0xff;
        check(&bad_sum, Err(MalformedReason::BadIpHeader));

        let mut frag = udp.clone();
        frag[6] = 0x20; // more fragments
        crate::build::fix_ipv4_checksum(&mut frag);
        check(&frag, Err(MalformedReason::Fragment));

        let mut gre = udp.clone();
        gre[9] = 47;
        crate::build::fix_ipv4_checksum(&mut gre);
        check(&gre, Err(MalformedReason::UnsupportedProtocol));
    }

    const STABLE_HASH_OF_TEST_KEY: u64 = 0xe57e_3f96_e056_2133;

    #[test]
    fn stable_hash_is_stable() {
        let k = classify(&tcp_v4([10, 0, 0, 1], [10, 200, 0, 10], 40000, 80, 0x02, &[])).unwrap().key;
        // A fixed value: nodes of one cluster must agree on it, so a change here is a change
        // of wire behaviour (consistent-hash placement, carrier source ports).
        assert_eq!(k.stable_hash(), STABLE_HASH_OF_TEST_KEY, "got {:#x}", k.stable_hash());
        let mut k2 = k;
        k2.src_port += 1;
        assert_ne!(k.stable_hash(), k2.stable_hash());
    }
}
