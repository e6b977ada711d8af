//! RFC 2003 IP-in-IP: an outer IPv4 header, protocol 4, in front of the inner packet.

use std::net::Ipv4Addr;
use std::ops::Range;

use crate::MalformedReason;

/// IP protocol number of IP-in-IP.
pub const IPPROTO_IPIP: u8 = 4;
/// Length of the outer header ringlb writes (no options).
pub const OUTER_LEN: usize = 20;

/// Writes the outer header for an inner packet of `inner_len` bytes into `out`.
///
/// DF is set: ringlb never relies on fragmentation, the TUN MTU leaves room for this header.
/// Returns `None` when the encapsulated packet would exceed 65535 bytes.
pub fn write_outer(out: &mut [u8; OUTER_LEN], src: Ipv4Addr, dst: Ipv4Addr, inner_len: usize, ttl: u8) -> Option<()> {
    let total = u16::try_from(OUTER_LEN + inner_len).ok()?;
    *out = [0; OUTER_LEN];
    out[0] = 0x45;
    out[2..4].copy_from_slice(&total.to_be_bytes());
    out[6] = 0x40; // DF
    out[8] = ttl;
    out[9] = IPPROTO_IPIP;
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    let sum = crate::checksum::finish(crate::checksum::add(0, &out[..]));
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    Some(())
}

/// Strips the outer header of a received IP-in-IP packet.
///
/// Returns the outer source (who sent it, to be checked against the members) and where the
/// inner packet lies in `pkt`. The inner packet itself is not checked here: [`crate::classify`]
/// does that.
pub fn decap(pkt: &[u8]) -> Result<(Ipv4Addr, Range<usize>), MalformedReason> {
    if pkt.len() < OUTER_LEN {
        return Err(MalformedReason::Truncated);
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if pkt[0] >> 4 != 4 || ihl < OUTER_LEN {
        return Err(MalformedReason::BadIpHeader);
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if total > pkt.len() || pkt.len() < ihl {
        return Err(MalformedReason::Truncated);
    }
    if total < ihl || pkt[9] != IPPROTO_IPIP {
        return Err(MalformedReason::BadIpHeader);
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    Ok((src, ihl..total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::udp_v4;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encap_decap_round_trip(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(),
            sport in any::<u16>(), dport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..1400),
        ) {
            let inner = udp_v4(src, dst, sport, dport, &payload);
            let mut outer = [0u8; OUTER_LEN];
            write_outer(&mut outer, Ipv4Addr::from(src), Ipv4Addr::from(dst), inner.len(), 64).unwrap();
            let mut pkt = outer.to_vec();
            pkt.extend_from_slice(&inner);
            // The outer header is valid IPv4 on its own: checksum folds to zero.
            prop_assert_eq!(crate::checksum::finish(crate::checksum::add(0, &pkt[..OUTER_LEN])), 0);
            let (from, range) = decap(&pkt).unwrap();
            let got = &pkt[range];
            prop_assert_eq!(from, Ipv4Addr::from(src));
            prop_assert_eq!(got, &inner[..]);
            let meta = crate::classify(got).unwrap();
            prop_assert_eq!((meta.key.src_port, meta.key.dst_port), (sport, dport));
        }

        #[test]
        fn decap_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decap(&bytes).map(|(_, inner)| crate::classify(&bytes[inner]));
        }
    }

    #[test]
    fn refuses_broken_outer_headers() {
        let inner = udp_v4([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, b"x");
        let mut outer = [0u8; OUTER_LEN];
        write_outer(&mut outer, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), inner.len(), 64).unwrap();
        let mut pkt = outer.to_vec();
        pkt.extend_from_slice(&inner);
        assert_eq!(decap(&pkt[..19]), Err(MalformedReason::Truncated));
        assert_eq!(decap(&pkt[..pkt.len() - 1]), Err(MalformedReason::Truncated));
        let mut bad = pkt.clone();
        bad[0] = 0x44;
        assert_eq!(decap(&bad), Err(MalformedReason::BadIpHeader));
        let mut not_ipip = pkt.clone();
        not_ipip[9] = 17;
        assert_eq!(decap(&not_ipip), Err(MalformedReason::BadIpHeader));
    }
}
