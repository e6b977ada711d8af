//! MSS clamping of TCP SYNs.

/// Lowers the MSS option of an IPv4 TCP SYN to at most `max_mss`, fixing the TCP checksum
/// incrementally (RFC 1624). Returns whether the packet was changed.
///
/// A SYN without an MSS option is left alone: the peer then assumes 536 bytes, which fits.
pub fn clamp_tcp_mss(pkt: &mut [u8], max_mss: u16) -> bool {
    let Some(ihl) = pkt.first().map(|b| usize::from(b & 0x0f) * 4) else { return false };
    if pkt.len() < ihl + 20 || pkt[0] >> 4 != 4 || pkt[9] != crate::IPPROTO_TCP {
        return false;
    }
    let tcp = &mut pkt[ihl..];
    if tcp[13] & 0x02 == 0 {
        return false; // not a SYN
    }
    let doff = usize::from(tcp[12] >> 4) * 4;
    if doff < 20 || doff > tcp.len() {
        return false;
    }
    let mut i = 20;
    while i < doff {
        match tcp[i] {
            0 => break,  // end of options
            1 => i += 1, // no-op
            kind => {
                let Some(&len) = tcp.get(i + 1) else { break };
                let len = usize::from(len);
                if len < 2 || i + len > doff {
                    break;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= max_mss {
                        return false;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&max_mss.to_be_bytes());
                    let sum = u16::from_be_bytes([tcp[16], tcp[17]]);
                    tcp[16..18].copy_from_slice(&update_checksum(sum, old, max_mss).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// RFC 1624 eq. 3: HC' = ~(~HC + ~m + m').
fn update_checksum(sum: u16, old: u16, new: u16) -> u16 {
    let mut acc = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(u16::try_from(acc).unwrap_or(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{tcp_checksum_ok, tcp_v4};

    fn syn_with_mss(mss: u16) -> Vec<u8> {
        let m = mss.to_be_bytes();
        // MSS, then NOP NOP SACK-permitted (as Linux sends), padded to 4.
        tcp_v4([10, 0, 0, 1], [10, 200, 0, 10], 40000, 80, 0x02, &[2, 4, m[0], m[1], 1, 1, 4, 2])
    }

    fn check(mut pkt: Vec<u8>, max: u16, want_changed: bool, want_mss: Option<u16>) {
        let changed = clamp_tcp_mss(&mut pkt, max);
        assert_eq!(changed, want_changed);
        assert!(tcp_checksum_ok(&pkt), "checksum broken");
        if let Some(w) = want_mss {
            assert_eq!(u16::from_be_bytes([pkt[42], pkt[43]]), w);
        }
    }

    #[test]
    fn clamps_only_when_larger() {
        check(syn_with_mss(1460), 1432, true, Some(1432));
        check(syn_with_mss(1400), 1432, false, Some(1400));
        check(syn_with_mss(1432), 1432, false, Some(1432));
        // Not a SYN: untouched.
        let mut ack = syn_with_mss(1460);
        ack[33] = 0x10;
        crate::build::fix_ipv4_checksum(&mut ack);
        let before = ack.clone();
        assert!(!clamp_tcp_mss(&mut ack, 1000));
        assert_eq!(ack, before);
        // No options at all.
        check(tcp_v4([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, 0x02, &[]), 1000, false, None);
    }

    #[test]
    fn survives_garbage_options() {
        for len in [0u8, 1, 40, 255] {
            let mut p = tcp_v4([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, 0x02, &[8, len, 0, 0]);
            let _ = clamp_tcp_mss(&mut p, 1000);
        }
        let _ = clamp_tcp_mss(&mut [], 1000);
        let _ = clamp_tcp_mss(&mut [0x4f; 30], 1000);
    }
}
