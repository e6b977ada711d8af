//! Classification of inner IP packets into flow keys.

use std::net::IpAddr;

use etherparse::err::packet::SliceError;
use etherparse::{Ipv6ExtensionSlice, LenSource, NetSlice, SlicedPacket, TransportSlice};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The 5-tuple that names a flow, as seen from the client (source = client).
///
/// Either IP family: addresses are held as 128 bits (an IPv4 address in the low 32, or
/// IPv4-mapped when the other address is IPv6) with a family flag, so that keys are built,
/// copied and compared in whole registers. [`FlowKey::src`] and [`FlowKey::dst`] give
/// them back as [`IpAddr`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    // 32-bit words, not u128: 4-byte alignment keeps the key at 40 bytes and a flow-table
    // slot at 64 (u128 made it 80, and the hit slower).
    src: [u32; 4],
    dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    v6: bool,
}

impl std::fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}:{} > {}:{}", self.proto, self.src(), self.src_port, self.dst(), self.dst_port)
    }
}

/// Whole words into the hasher (two for IPv4) rather than byte by byte. Consistent with
/// `Eq`: equal keys write the same words.
impl std::hash::Hash for FlowKey {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.ports_word());
        if self.v6 {
            state.write_u128(bits(self.src));
            state.write_u128(bits(self.dst));
        } else {
            state.write_u64(self.v4_word());
        }
    }
}

fn to_v6_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().to_bits(),
        IpAddr::V6(a) => a.to_bits(),
    }
}

fn to_ip(words: [u32; 4], v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(std::net::Ipv6Addr::from_bits(bits(words)))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::from_bits(words[3]))
    }
}

/// 128 bits as four words, most significant first.
fn words(b: u128) -> [u32; 4] {
    // Truncations intended: each takes one 32-bit quarter.
    #[allow(clippy::cast_possible_truncation)]
    [(b >> 96) as u32, (b >> 64) as u32, (b >> 32) as u32, b as u32]
}

fn bits(w: [u32; 4]) -> u128 {
    u128::from(w[0]) << 96 | u128::from(w[1]) << 64 | u128::from(w[2]) << 32 | u128::from(w[3])
}

impl FlowKey {
    pub fn new(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16, proto: u8) -> Self {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => FlowKey::v4(s.to_bits(), d.to_bits(), src_port, dst_port, proto),
            (s, d) => {
                FlowKey { src: words(to_v6_bits(s)), dst: words(to_v6_bits(d)), src_port, dst_port, proto, v6: true }
            }
        }
    }

    #[inline]
    fn v4(src: u32, dst: u32, src_port: u16, dst_port: u16, proto: u8) -> Self {
        FlowKey { src: [0, 0, 0, src], dst: [0, 0, 0, dst], src_port, dst_port, proto, v6: false }
    }

    /// The client's address.
    pub fn src(&self) -> IpAddr {
        to_ip(self.src, self.v6)
    }

    /// The service address (the VIP, for packets ringlb routes).
    pub fn dst(&self) -> IpAddr {
        to_ip(self.dst, self.v6)
    }

    /// Whether the destination is `addr`, without building an [`IpAddr`].
    #[inline]
    pub fn dst_is(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) if !self.v6 => self.dst[3] == a.to_bits(),
            _ => self.dst() == addr,
        }
    }

    /// Ports and protocol in one word.
    #[inline]
    fn ports_word(&self) -> u64 {
        u64::from(self.src_port) << 24 | u64::from(self.dst_port) << 8 | u64::from(self.proto)
    }

    /// Both IPv4 addresses in one word.
    #[inline]
    fn v4_word(&self) -> u64 {
        // IPv4 keys hold each address in the last word.
        u64::from(self.src[3]) << 32 | u64::from(self.dst[3])
    }

    /// A hash of the 5-tuple that is the same on every node and every run.
    ///
    /// Used where nodes must agree without talking (consistent hashing, the carrier's outer
    /// source port), so it is a fixed function, not a per-process keyed hasher.
    ///
    /// Word-wise: the ports and protocol make one word, the IPv4 addresses one more (IPv6:
    /// two per address), and every word goes through [`mix64`] before the next is folded in.
    #[inline]
    pub fn stable_hash(&self) -> u64 {
        let mut h = mix64(self.ports_word() ^ 0x9e37_79b9_7f4a_7c15);
        let mut eat = |w: u64| h = mix64(h ^ w);
        if self.v6 {
            for bits in [bits(self.src), bits(self.dst)] {
                // Truncations intended: the high and the low half of the address.
                #[allow(clippy::cast_possible_truncation)]
                {
                    eat((bits >> 64) as u64);
                    eat(bits as u64);
                }
            }
        } else {
            eat(self.v4_word());
        }
        h
    }
}

/// SplitMix64's finaliser: spreads a hash's weak low bits over the whole word.
#[inline]
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
    Some(FlowKey::new(addr(16), addr(12), port(ihl + 2), port(ihl), proto))
}

/// Parses an inner IP packet (no link header) into its flow key.
///
/// Checks what the kernel checks before it would deliver the packet (IPv4 header checksum,
/// IP, TCP and UDP header lengths; no IPsec header, which needs a security association), so that nothing ringlb forwards can be refused later for a reason it could have
/// seen here. Fragments are refused: ringlb never depends on IP fragmentation.
#[inline(always)]
pub fn classify(pkt: &[u8]) -> Result<PacketMeta, MalformedReason> {
    match classify_fast(pkt) {
        Some(meta) => Ok(meta),
        None => classify_full(pkt),
    }
}

/// Both paths' answers, for the fuzz target that holds them to each other.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn classify_paths(pkt: &[u8]) -> (Option<PacketMeta>, Result<PacketMeta, MalformedReason>) {
    (classify_fast(pkt), classify_full(pkt))
}

/// The common case, read straight from the bytes: an unfragmented IPv4 packet whose total
/// length is the buffer's length, with a valid header checksum, carrying a TCP segment or a
/// UDP datagram whose headers fit. It answers only when it is sure; anything else (IPv6,
/// ICMP, options it cannot vouch for, any error) is left to [`classify_full`], so both give
/// the same answer for every input (a property test holds them to that).
#[inline(always)]
fn classify_fast(pkt: &[u8]) -> Option<PacketMeta> {
    let first = *pkt.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || pkt.len() < ihl || usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len()
    {
        return None;
    }
    // More fragments, or a fragment offset: not ours to judge here.
    if pkt[6] & 0x3f != 0 || pkt[7] != 0 {
        return None;
    }
    if !ipv4_header_sum_ok(&pkt[..ihl]) {
        return None;
    }
    let l4 = &pkt[ihl..];
    let proto = pkt[9];
    let kind = match proto {
        IPPROTO_TCP => {
            let doff = usize::from(*l4.get(12)? >> 4) * 4;
            if doff < 20 || l4.len() < doff {
                return None;
            }
            let f = l4[13];
            L4::Tcp(TcpFlags { syn: f & 0x02 != 0, ack: f & 0x10 != 0, fin: f & 0x01 != 0, rst: f & 0x04 != 0 })
        }
        IPPROTO_UDP => {
            if l4.len() < 8 || usize::from(u16::from_be_bytes([l4[4], l4[5]])) != l4.len() {
                return None;
            }
            L4::Udp
        }
        _ => return None,
    };
    // Whole words, not bytes: assembling addresses byte by byte on the stack and reading
    // them back as one value stalls store forwarding, which was most of this function's time.
    let word = |at: usize| u32::from_be_bytes([pkt[at], pkt[at + 1], pkt[at + 2], pkt[at + 3]]);
    let ports = u32::from_be_bytes([l4[0], l4[1], l4[2], l4[3]]);
    #[allow(clippy::cast_possible_truncation)] // the two halves of the ports word
    let (src_port, dst_port) = ((ports >> 16) as u16, ports as u16);
    Some(PacketMeta { key: FlowKey::v4(word(12), word(16), src_port, dst_port, proto), l4: kind })
}

/// Whether an IPv4 header (a multiple of 4 bytes long) sums to 0xffff, one's complement.
/// Adding 32-bit words and folding the carries gives the same sum as adding 16-bit ones.
#[inline]
fn ipv4_header_sum_ok(header: &[u8]) -> bool {
    let mut sum: u64 = header.chunks_exact(4).map(|w| u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))).sum();
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Every case, through etherparse. Kept out of line so that the fast path stays small.
#[inline(never)]
fn classify_full(pkt: &[u8]) -> Result<PacketMeta, MalformedReason> {
    let sliced = SlicedPacket::from_ip(pkt).map_err(|e| match e {
        // A UDP length below the UDP header's own 8 bytes.
        SliceError::Len(e) if e.len_source == LenSource::UdpHeaderLen => MalformedReason::BadTransportHeader,
        SliceError::Len(_) => MalformedReason::Truncated,
        SliceError::Tcp(_) => MalformedReason::BadTransportHeader,
        _ => MalformedReason::BadIpHeader,
    })?;
    // Where etherparse is more lenient than the kernel, the kernel's rule wins.
    let (src, dst) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            if !ipv4_header_sum_ok(h.slice()) {
                return Err(MalformedReason::BadIpHeader);
            }
            if h.is_fragmenting_payload() {
                return Err(MalformedReason::Fragment);
            }
            // etherparse walks through an authentication header to the transport; the kernel
            // drops the packet unless a security association matches, and ringlb has none.
            if !v4.extensions().is_empty() {
                return Err(MalformedReason::UnsupportedProtocol);
            }
            (IpAddr::V4(h.source_addr()), IpAddr::V4(h.destination_addr()))
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            // etherparse takes the rest of the buffer as payload; to the kernel it means a
            // jumbogram, which needs a hop-by-hop option, and ringlb carries none.
            if h.payload_length() == 0 {
                return Err(MalformedReason::BadIpHeader);
            }
            if v6.is_payload_fragmented() {
                return Err(MalformedReason::Fragment);
            }
            if v6.extensions().clone().into_iter().any(|e| matches!(e, Ipv6ExtensionSlice::Authentication(_))) {
                return Err(MalformedReason::UnsupportedProtocol);
            }
            (IpAddr::V6(h.source_addr()), IpAddr::V6(h.destination_addr()))
        }
        _ => return Err(MalformedReason::BadIpHeader),
    };
    let (src_port, dst_port, proto, l4) = match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let flags = TcpFlags { syn: t.syn(), ack: t.ack(), fin: t.fin(), rst: t.rst() };
            (t.source_port(), t.destination_port(), IPPROTO_TCP, L4::Tcp(flags))
        }
        // Length 0: etherparse falls back to the IP payload's; the kernel drops it (IPv4), or
        // reads it as a jumbogram's (IPv6), which ringlb refused above.
        Some(TransportSlice::Udp(u)) if u.length() == 0 => return Err(MalformedReason::BadTransportHeader),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port(), IPPROTO_UDP, L4::Udp),
        // ICMPv4 only over IPv4: the kernel has no handler for protocol 1 in IPv6 and drops it.
        Some(TransportSlice::Icmpv4(icmp)) if src.is_ipv4() => {
            let error_for = matches!(icmp.type_u8(), 3 | 11 | 12).then(|| quoted_flow(icmp.payload())).flatten();
            (0, 0, IPPROTO_ICMP, L4::Icmp { error_for })
        }
        _ => return Err(MalformedReason::UnsupportedProtocol),
    };
    Ok(PacketMeta { key: FlowKey::new(src, dst, src_port, dst_port, proto), l4 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{tcp_v4, udp_v4};

    /// Classifies `pkt`, and holds the fast path to the full one wherever it answers.
    fn check(pkt: &[u8], want: Result<(u8, u16, u16), MalformedReason>) {
        let got = classify(pkt).map(|m| (m.key.proto, m.key.src_port, m.key.dst_port));
        assert_eq!(got, want, "packet {pkt:02x?}");
        if let Some(fast) = classify_fast(pkt) {
            assert_eq!(Ok(fast), classify_full(pkt), "paths disagree on {pkt:02x?}");
        }
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

    /// Packets the kernel drops before any socket sees them: refused on both paths, so that
    /// ringlb never forwards what the serving node would throw away.
    #[test]
    fn refuses_what_the_kernel_drops() {
        use MalformedReason::*;
        let (client, vip) = ([10, 0, 0, 1], [10, 200, 0, 10]);
        // UDP length: the kernel drops one below 8 or beyond the IP payload, and trims the IP
        // payload to a shorter one.
        let udp = udp_v4(client, vip, 5353, 53, b"hello");
        let udp_len = |p: &[u8], at: usize, len: u16| {
            let mut p = p.to_vec();
            p[at..at + 2].copy_from_slice(&len.to_be_bytes());
            p
        };
        for (len, want) in [
            (0, Err(BadTransportHeader)),
            (1, Err(BadTransportHeader)),
            (7, Err(BadTransportHeader)),
            (8, Ok((IPPROTO_UDP, 5353, 53))),
            (12, Ok((IPPROTO_UDP, 5353, 53))),
            (13, Ok((IPPROTO_UDP, 5353, 53))),
            (14, Err(Truncated)),
            (0xffff, Err(Truncated)),
        ] {
            check(&udp_len(&udp, 24, len), want);
        }

        // IPv4 with an authentication header before TCP: without a security association
        // the kernel drops it; etherparse walks through it to the TCP header.
        let tcp = tcp_v4(client, vip, 40000, 80, 0x02, &[]);
        let mut ah = tcp[..20].to_vec();
        ah[9] = 51;
        ah.extend_from_slice(&[IPPROTO_TCP, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]);
        ah.extend_from_slice(&tcp[20..]);
        let total = u16::try_from(ah.len()).unwrap();
        ah[2..4].copy_from_slice(&total.to_be_bytes());
        crate::build::fix_ipv4_checksum(&mut ah);
        check(&ah, Err(UnsupportedProtocol));

        // IPv6: payload length 0 (a jumbogram's, without the hop-by-hop option that makes one),
        // UDP lengths as above, and AH.
        let (client6, vip6) = ([0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0xfd; 16]);
        let udp6 = crate::build::udp_v6(client6, vip6, 5353, 53, b"hello");
        check(&udp6, Ok((IPPROTO_UDP, 5353, 53)));
        check(&udp_len(&udp6, 4, 0), Err(BadIpHeader));
        check(&udp_len(&udp6, 4, 12), Err(Truncated)); // the UDP length is now beyond it
        let mut padded = udp6.clone();
        padded.push(0);
        check(&padded, Ok((IPPROTO_UDP, 5353, 53)));
        check(&udp_len(&udp6, 4, 14), Err(Truncated));
        check(&udp_len(&udp6, 44, 0), Err(BadTransportHeader));
        check(&udp_len(&udp6, 44, 7), Err(BadTransportHeader));
        check(&udp_len(&udp6, 44, 14), Err(Truncated));
        let mut ah6 = udp6[..40].to_vec();
        ah6[6] = 51;
        ah6.extend_from_slice(&[IPPROTO_UDP, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]);
        ah6.extend_from_slice(&udp6[40..]);
        let payload_len = u16::try_from(ah6.len() - 40).unwrap();
        ah6[4..6].copy_from_slice(&payload_len.to_be_bytes());
        check(&ah6, Err(UnsupportedProtocol));
        // ICMPv4 (protocol 1) over IPv6, which etherparse reads as ICMP (found by fuzzing).
        let mut icmp4_in_6 = udp6[..40].to_vec();
        icmp4_in_6[6] = IPPROTO_ICMP;
        icmp4_in_6.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
        icmp4_in_6[4..6].copy_from_slice(&8u16.to_be_bytes());
        check(&icmp4_in_6, Err(UnsupportedProtocol));
    }

    /// Packets near the common case: well-formed TCP, UDP and ICMP ones with a few bytes
    /// changed, some of them with the header checksum fixed again afterwards.
    fn near_valid() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let shape = (any::<[u8; 4]>(), any::<u16>(), any::<u16>(), any::<u8>(), 0usize..3, 0usize..40);
        let base =
            (shape, 0usize..3, 0usize..3).prop_map(|((src, sport, dport, flags, kind, len), tcp_opts, ip_opts)| {
                let payload = vec![0x5a; len];
                // TCP and IPv4 options (NOPs) too, so data offsets and header lengths above 5 occur.
                let with_ip_options = |mut p: Vec<u8>| {
                    if ip_opts > 0 {
                        let words = u8::try_from(ip_opts).unwrap();
                        p.splice(20..20, std::iter::repeat_n(1u8, 4 * ip_opts));
                        p[0] = 0x45 + words;
                        let total = u16::try_from(p.len()).unwrap();
                        p[2..4].copy_from_slice(&total.to_be_bytes());
                        crate::build::fix_ipv4_checksum(&mut p);
                    }
                    p
                };
                match kind {
                    0 => {
                        let opts = vec![1u8; 4 * tcp_opts];
                        let mut p = tcp_v4(src, [10, 200, 0, 10], sport, dport, flags, &opts);
                        p.extend_from_slice(&payload);
                        let total = u16::try_from(p.len()).unwrap();
                        p[2..4].copy_from_slice(&total.to_be_bytes());
                        crate::build::fix_ipv4_checksum(&mut p);
                        with_ip_options(p)
                    }
                    1 => with_ip_options(udp_v4(src, [10, 200, 0, 10], sport, dport, &payload)),
                    _ => {
                        let mut p = udp_v4(src, [10, 200, 0, 10], sport, dport, &payload);
                        p[9] = IPPROTO_ICMP;
                        crate::build::fix_ipv4_checksum(&mut p);
                        p
                    }
                }
            });
        let edits = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4);
        (base, edits, any::<bool>(), 0usize..8).prop_map(|(mut p, edits, fix, cut)| {
            for (at, v) in edits {
                let i = at.index(p.len());
                p[i] = v;
            }
            if fix && p.len() >= 20 && (p[0] & 0x0f) >= 5 && usize::from(p[0] & 0x0f) * 4 <= p.len() {
                crate::build::fix_ipv4_checksum(&mut p);
            }
            p.truncate(p.len().saturating_sub(cut));
            p
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]
        /// The fast path is only a shortcut: wherever it answers, etherparse agrees.
        #[test]
        fn fast_path_agrees_with_etherparse(p in near_valid()) {
            if let Some(fast) = classify_fast(&p) {
                proptest::prop_assert_eq!(Ok(fast), classify_full(&p));
            }
            proptest::prop_assert_eq!(classify(&p), classify_full(&p));
        }
    }

    #[test]
    fn fast_path_takes_the_common_cases() {
        let tcp = tcp_v4([10, 0, 0, 1], [10, 200, 0, 10], 40000, 80, 0x12, &[2, 4, 5, 0xb4]);
        let udp = udp_v4([10, 0, 0, 1], [10, 200, 0, 10], 5353, 53, b"hi");
        assert!(classify_fast(&tcp).is_some());
        assert!(classify_fast(&udp).is_some());
        assert_eq!(classify_fast(&tcp), classify_full(&tcp).ok());
    }

    #[test]
    fn keys_give_back_their_addresses() {
        let (c4, v4): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.200.0.10".parse().unwrap());
        let (c6, v6): (IpAddr, IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::10".parse().unwrap());
        for (c, v) in [(c4, v4), (c6, v6)] {
            let k = FlowKey::new(c, v, 40000, 80, IPPROTO_TCP);
            assert_eq!((k.src(), k.dst()), (c, v));
            assert!(k.dst_is(v) && !k.dst_is(c));
        }
        // The same bits in the two families are different keys.
        let k4 = FlowKey::new(c4, v4, 1, 2, IPPROTO_UDP);
        let mapped = |a: IpAddr| match a {
            IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
            a => a,
        };
        let k6 = FlowKey::new(mapped(c4), mapped(v4), 1, 2, IPPROTO_UDP);
        assert_ne!(k4, k6);
        assert!(!k6.dst_is(v4));
    }

    const STABLE_HASH_OF_TEST_KEY: u64 = 0xeed5_f90a_ea4c_b3b7;

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
