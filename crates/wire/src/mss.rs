//! MSS clamping of TCP SYNs.

/// Lowers every MSS option of an IPv4 TCP SYN to at most `max_mss`, fixing the TCP checksum
/// incrementally (RFC 1624). Returns whether the packet was changed.
///
/// Every MSS option, not only the first: a receiver takes the last one it reads (Linux does).
/// Options are walked as Linux walks them, so that an option it never reads is not touched.
/// A packet whose header lengths disagree (IHL, total length, data offset) or that is a
/// fragment is left alone; so is a SYN without an MSS option: the peer then assumes 536 bytes,
/// which fits.
pub fn clamp_tcp_mss(pkt: &mut [u8], max_mss: u16) -> bool {
    let Some(tcp) = syn_segment(pkt) else { return false };
    let doff = usize::from(tcp[12] >> 4) * 4;
    let mut changed = false;
    let mut i = 20;
    while i < doff {
        match tcp[i] {
            0 => break,  // end of options
            1 => i += 1, // no-op
            kind => {
                if i + 1 >= doff {
                    break;
                }
                let len = usize::from(tcp[i + 1]);
                if len < 2 || i + len > doff {
                    break;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old > max_mss {
                        tcp[i + 2..i + 4].copy_from_slice(&max_mss.to_be_bytes());
                        // The checksum sums 16-bit words from the header's start. A value at
                        // an odd offset (after one NOP) straddles two words and adds its bytes
                        // swapped: 2^16 = 1 in one's-complement arithmetic.
                        let (old, new) =
                            if i % 2 == 0 { (old, max_mss) } else { (old.swap_bytes(), max_mss.swap_bytes()) };
                        let sum = u16::from_be_bytes([tcp[16], tcp[17]]);
                        tcp[16..18].copy_from_slice(&update_checksum(sum, old, new).to_be_bytes());
                        changed = true;
                    }
                }
                i += len;
            }
        }
    }
    changed
}

/// The TCP segment of an unfragmented IPv4 SYN (up to the IP total length), if its header
/// lengths are consistent: IHL at least 5, total length within the buffer and covering both
/// headers, data offset at least 5 and within the segment.
fn syn_segment(pkt: &mut [u8]) -> Option<&mut [u8]> {
    let first = *pkt.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || pkt.len() < ihl {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if total > pkt.len() || total < ihl + 20 || pkt[9] != crate::IPPROTO_TCP {
        return None;
    }
    // More fragments, or a fragment offset: no TCP header where one would be.
    if pkt[6] & 0x3f != 0 || pkt[7] != 0 {
        return None;
    }
    let tcp = &mut pkt[ihl..total];
    let doff = usize::from(tcp[12] >> 4) * 4;
    if tcp[13] & 0x02 == 0 || doff < 20 || doff > tcp.len() {
        return None;
    }
    Some(tcp)
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

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The values of the MSS options a receiver reads (kind 2, length 4), walked as Linux does.
    fn mss_values(pkt: &[u8]) -> Vec<u16> {
        let tcp = &pkt[usize::from(pkt[0] & 0x0f) * 4..];
        let doff = usize::from(tcp[12] >> 4) * 4;
        let (mut i, mut out) = (20, Vec::new());
        while i < doff {
            match tcp[i] {
                0 => break,
                1 => i += 1,
                kind => {
                    let len = usize::from(*tcp.get(i + 1).unwrap_or(&0));
                    if i + 1 >= doff || len < 2 || i + len > doff {
                        break;
                    }
                    if kind == 2 && len == 4 {
                        out.push(u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]));
                    }
                    i += len;
                }
            }
        }
        out
    }

    /// Clamps `pkt` to `max` and checks the outcome: whether it changed, the MSS values after,
    /// a valid TCP checksum (when it was valid before), and that a second clamp changes nothing.
    fn check(mut pkt: Vec<u8>, max: u16, want_changed: bool, want_mss: &[u16]) {
        let before = pkt.clone();
        let sum_ok = tcp_checksum_ok(&before);
        let changed = clamp_tcp_mss(&mut pkt, max);
        assert_eq!(changed, want_changed, "changed, packet {before:02x?}");
        assert_eq!(changed, pkt != before);
        assert_eq!(sum_ok, tcp_checksum_ok(&pkt), "checksum broken: {pkt:02x?}");
        assert_eq!(mss_values(&pkt), want_mss);
        let once = pkt.clone();
        assert!(!clamp_tcp_mss(&mut pkt, max));
        assert_eq!(pkt, once);
    }

    #[test]
    fn clamps_only_when_larger() {
        check(syn_with_mss(1460), 1432, true, &[1432]);
        check(syn_with_mss(1400), 1432, false, &[1400]);
        check(syn_with_mss(1432), 1432, false, &[1432]);
        // Not a SYN: untouched.
        let mut ack = syn_with_mss(1460);
        ack[33] = 0x10;
        crate::build::fix_ipv4_checksum(&mut ack);
        check(ack, 1000, false, &[1460]);
        // No options at all.
        check(tcp_v4([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, 0x02, &[]), 1000, false, &[]);
    }

    #[test]
    fn clamps_an_mss_that_is_not_word_aligned() {
        // A SYN whose MSS follows a single NOP, so its value straddles two 16-bit words.
        let syn =
            hex("4500003012344000400613110a4e00640ac8000a9c40005000000001000000007002ffff23bd000001020405b4010100");
        assert!(tcp_checksum_ok(&syn));
        let mut clamped = syn.clone();
        assert!(clamp_tcp_mss(&mut clamped, 1432));
        assert_eq!(&clamped[36..38], &[0x3f, 0xbd], "tcp checksum");
        check(syn, 1432, true, &[1432]);
        // Every offset from the TCP header's start: after 0 to 3 NOPs.
        for nops in 0..4 {
            let mut opts = vec![1u8; nops];
            opts.extend_from_slice(&[2, 4, 0x23, 0x28]);
            opts.resize(8, 0);
            check(tcp_v4([10, 0, 0, 1], [10, 200, 0, 10], 1, 80, 0x02, &opts), 1432, true, &[1432]);
        }
    }

    #[test]
    fn clamps_every_mss_option() {
        // Linux takes the last MSS option: 9000 here, unless it is clamped too.
        let syn = tcp_v4([10, 0, 0, 1], [10, 200, 0, 10], 1, 80, 0x02, &[2, 4, 0x03, 0xe8, 2, 4, 0x23, 0x28]);
        check(syn, 1432, true, &[1000, 1432]);
        let syn =
            tcp_v4([10, 0, 0, 1], [10, 200, 0, 10], 1, 80, 0x02, &[2, 4, 0x23, 0x28, 1, 2, 4, 0x23, 0x28, 0, 0, 0]);
        check(syn, 1432, true, &[1432, 1432]);
    }

    #[test]
    fn refuses_inconsistent_header_lengths() {
        // IHL 0: the "TCP header" would start at the IP header, its checksum field on the
        // destination address, its "MSS option" on the real ports.
        let mut p = tcp_v4([0x60, 0x02, 0, 1], [10, 200, 0, 10], 0x0204, 1460, 0x02, &[]);
        for ihl in 0..5 {
            p[0] = 0x40 | ihl;
            let before = p.clone();
            assert!(!clamp_tcp_mss(&mut p, 1000), "ihl {ihl}");
            assert_eq!(p, before, "ihl {ihl}");
        }
        let syn = syn_with_mss(1460);
        let with_total = |total: usize| {
            let mut p = syn.clone();
            p[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
            crate::build::fix_ipv4_checksum(&mut p);
            p
        };
        // Total length beyond the buffer, or too short for the TCP header and its options.
        for total in [0, 19, 20, 39, 40, 47, syn.len() + 1] {
            let mut p = with_total(total);
            let before = p.clone();
            assert!(!clamp_tcp_mss(&mut p, 1000), "total length {total}");
            assert_eq!(p, before);
        }
        // Bytes after the total length (link-layer padding) are not part of the segment.
        let mut padded = syn.clone();
        padded.extend_from_slice(&[0xff; 6]);
        check(padded, 1000, true, &[1000]);
        // A fragment carries no TCP header at its start.
        let mut frag = syn.clone();
        frag[6] = 0x20;
        crate::build::fix_ipv4_checksum(&mut frag);
        check(frag, 1000, false, &[1460]);
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
