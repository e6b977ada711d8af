//! What the fuzz targets hold ringlb's parsers to, written apart from them: one's-complement
//! sums, a model of what the Linux receive path accepts, and shaping that turns random bytes
//! into packets that get past the first length or checksum check.
//!
//! Nothing here reuses `ringlb-wire`'s own helpers: a shared bug would hide itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with zero) to `sum`.
pub fn sum16(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds carries back in: the one's-complement sum in 16 bits.
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Whether an IPv4 header's checksum verifies.
pub fn ipv4_header_ok(header: &[u8]) -> bool {
    fold(sum16(0, header)) == 0xffff
}

/// The one's-complement sum of an IPv4 TCP segment with its pseudo-header, checksum field
/// included: 0xffff when the checksum verifies.
pub fn tcp_v4_sum(pkt: &[u8], ihl: usize, total: usize) -> u16 {
    let seg = &pkt[ihl..total];
    let mut sum = sum16(0, &pkt[12..20]);
    sum += 6 + seg.len() as u64;
    fold(sum16(sum, seg))
}

/// Writes the IPv4 header checksum, if the IHL fits the buffer.
pub fn fix_ipv4_header(pkt: &mut [u8]) {
    let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
    if ihl < 20 || pkt.len() < ihl {
        return;
    }
    pkt[10] = 0;
    pkt[11] = 0;
    let sum = !fold(sum16(0, &pkt[..ihl]));
    pkt[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Sets the IP length field (IPv4 total, IPv6 payload) to what the buffer holds.
pub fn fix_ip_length(pkt: &mut [u8]) {
    match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 4 => {
            let len = u16::try_from(pkt.len()).unwrap_or(u16::MAX);
            pkt[2..4].copy_from_slice(&len.to_be_bytes());
        }
        Some(6) if pkt.len() >= 40 => {
            let len = u16::try_from(pkt.len() - 40).unwrap_or(u16::MAX);
            pkt[4..6].copy_from_slice(&len.to_be_bytes());
        }
        _ => {}
    }
}

/// A flow as the model reads it: addresses, protocol, ports (0 for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// What should become of a packet ringlb reads: taken (the kernel would deliver it, and it
/// is TCP, UDP or ICMP over IPv4, or TCP or UDP over IPv6), or refused, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Take(Flow),
    Refuse(&'static str),
}

/// The receive path's rules, as Linux applies them (`ip_rcv_core`, `ipv6_rcv`, `tcp_v4_rcv`,
/// `__udp4_lib_rcv`, `icmp_rcv`), plus ringlb's own refusals (fragments, IPsec, protocols it
/// does not balance, ICMP timestamps of another length than 20 bytes). Not modelled: the contents of IPv4 options and of IPv6 hop-by-hop and
/// destination options, routing headers with segments left, and transport checksums, which
/// the serving node's kernel checks (offloaded packets carry none yet).
pub fn expect(pkt: &[u8]) -> Expect {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => expect_v4(pkt),
        Some(6) => expect_v6(pkt),
        _ => Expect::Refuse("not IPv4 or IPv6"),
    }
}

fn expect_v4(pkt: &[u8]) -> Expect {
    use Expect::Refuse;
    if pkt.len() < 20 {
        return Refuse("shorter than an IPv4 header");
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl {
        return Refuse("ihl");
    }
    if !ipv4_header_ok(&pkt[..ihl]) {
        return Refuse("header checksum");
    }
    let total = usize::from(be16(pkt, 2));
    if total > pkt.len() || total < ihl {
        return Refuse("total length");
    }
    if pkt[6] & 0x3f != 0 || pkt[7] != 0 {
        return Refuse("fragment");
    }
    let src = IpAddr::V4(Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]));
    let seg = &pkt[ihl..total];
    match pkt[9] {
        1 if seg.len() < 8 => Refuse("icmp header"),
        // ringlb's own (etherparse's): a timestamp message must be exactly 20 bytes; Linux
        // answers a longer request. Harmless: such ICMP is answered locally either way.
        1 if matches!(seg[0], 13 | 14) && seg[1] == 0 && seg.len() != 20 => Refuse("icmp timestamp length"),
        1 => Expect::Take(Flow { src, dst, proto: 1, src_port: 0, dst_port: 0 }),
        p => transport(src, dst, p, seg),
    }
}

fn transport(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> Expect {
    use Expect::Refuse;
    match proto {
        6 => {
            if seg.len() < 20 {
                return Refuse("tcp header");
            }
            let doff = usize::from(seg[12] >> 4) * 4;
            if doff < 20 || doff > seg.len() {
                return Refuse("tcp data offset");
            }
        }
        17 => {
            if seg.len() < 8 {
                return Refuse("udp header");
            }
            let len = usize::from(be16(seg, 4));
            // The kernel trims the IP payload to a shorter UDP length, drops a longer one.
            if len < 8 || len > seg.len() {
                return Refuse("udp length");
            }
        }
        51 => return Refuse("authentication header"),
        _ => return Refuse("protocol not balanced"),
    }
    Expect::Take(Flow { src, dst, proto, src_port: be16(seg, 0), dst_port: be16(seg, 2) })
}

fn expect_v6(pkt: &[u8]) -> Expect {
    use Expect::Refuse;
    if pkt.len() < 40 {
        return Refuse("shorter than an IPv6 header");
    }
    let payload = usize::from(be16(pkt, 4));
    if payload == 0 {
        return Refuse("payload length 0 without a jumbo option");
    }
    if 40 + payload > pkt.len() {
        return Refuse("payload length");
    }
    let addr = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&pkt[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    let (src, dst) = (addr(8), addr(24));
    let pkt = &pkt[..40 + payload];
    let (mut next, mut at) = (pkt[6], 40);
    for first in std::iter::once(true).chain(std::iter::repeat(false)) {
        let rest = &pkt[at..];
        match next {
            0 if !first => return Refuse("hop-by-hop not first"),
            0 | 43 | 60 => {
                if rest.len() < 8 {
                    return Refuse("extension header");
                }
                let len = (usize::from(rest[1]) + 1) * 8;
                if len > rest.len() {
                    return Refuse("extension header length");
                }
                (next, at) = (rest[0], at + len);
            }
            44 => {
                if rest.len() < 8 {
                    return Refuse("fragment header");
                }
                if be16(rest, 2) & 0xfff9 != 0 {
                    return Refuse("fragment");
                }
                (next, at) = (rest[0], at + 8);
            }
            p => return transport(src, dst, p, rest),
        }
    }
    unreachable!("the loop returns")
}

/// The flow an ICMPv4 error quotes (its IPv4 header and the first 4 bytes after it), turned
/// round: the quoted packet went from the service to the client.
pub fn quoted_flow(icmp: &[u8]) -> Option<Flow> {
    if !matches!(icmp[0], 3 | 11 | 12) {
        return None;
    }
    let q = &icmp[8..];
    let ihl = usize::from(*q.first()? & 0x0f) * 4;
    if q[0] >> 4 != 4 || ihl < 20 || q.len() < ihl + 4 || !matches!(q[9], 6 | 17) {
        return None;
    }
    Some(Flow {
        src: IpAddr::V4(Ipv4Addr::new(q[16], q[17], q[18], q[19])),
        dst: IpAddr::V4(Ipv4Addr::new(q[12], q[13], q[14], q[15])),
        proto: q[9],
        src_port: be16(q, ihl + 2),
        dst_port: be16(q, ihl),
    })
}
