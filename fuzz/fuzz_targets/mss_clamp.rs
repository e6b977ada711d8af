//! `clamp_tcp_mss` on arbitrary bytes. On a consistent, unfragmented IPv4 TCP SYN, every MSS
//! option a receiver reads becomes min(value, max) and nothing else changes but the TCP
//! checksum, which still verifies (more exactly: the one's-complement sum over pseudo-header
//! and segment is what it was, valid or not). Anything else is left as it was. Clamping twice
//! is clamping once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb_fuzz::{be16, fix_ip_length, fix_ipv4_header, tcp_v4_sum};
use ringlb_wire::clamp_tcp_mss;

/// Where a SYN's MSS values lie (offsets into the packet), walking its options as Linux's
/// `tcp_parse_options` does; `None` when the packet is no SYN a receiver would parse.
fn mss_offsets(pkt: &[u8]) -> Option<(usize, usize, Vec<usize>)> {
    let ihl = usize::from(*pkt.first()? & 0x0f) * 4;
    if pkt[0] >> 4 != 4 || ihl < 20 || pkt.len() < ihl {
        return None;
    }
    let total = usize::from(be16(pkt, 2));
    if total > pkt.len() || total < ihl + 20 || pkt[9] != 6 || pkt[6] & 0x3f != 0 || pkt[7] != 0 {
        return None;
    }
    let tcp = &pkt[ihl..total];
    let doff = usize::from(tcp[12] >> 4) * 4;
    if tcp[13] & 0x02 == 0 || doff < 20 || doff > tcp.len() {
        return None;
    }
    let mut at = Vec::new();
    let mut opts = &tcp[20..doff];
    let mut off = ihl + 20;
    while let Some(&kind) = opts.first() {
        let size = match kind {
            0 => break,
            1 => 1,
            _ => {
                let Some(&size) = opts.get(1) else { break };
                let size = usize::from(size);
                if size < 2 || size > opts.len() {
                    break;
                }
                if kind == 2 && size == 4 {
                    at.push(off + 2);
                }
                size
            }
        };
        opts = &opts[size..];
        off += size;
    }
    Some((ihl, total, at))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (shape, max) = (data[0], be16(data, 1));
    let mut pkt = data[3..].to_vec();
    // Make the common case common: IPv4 TCP, lengths and header sum right, SYN set, and the
    // TCP checksum valid.
    if shape & 1 != 0 && pkt.len() >= 20 {
        pkt[0] = 0x40 | (pkt[0] & 0x0f);
        pkt[9] = 6;
        fix_ip_length(&mut pkt);
        fix_ipv4_header(&mut pkt);
    }
    let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
    if shape & 2 != 0 && ihl >= 20 && pkt.len() >= ihl + 20 {
        pkt[ihl + 13] |= 0x02;
    }
    if shape & 4 != 0 {
        if let Some((ihl, total, _)) = mss_offsets(&pkt) {
            pkt[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
            let sum = !tcp_v4_sum(&pkt, ihl, total);
            pkt[ihl + 16..ihl + 18].copy_from_slice(&sum.to_be_bytes());
        }
    }

    let before = pkt.clone();
    let changed = clamp_tcp_mss(&mut pkt, max);
    assert_eq!(changed, pkt != before, "return value");
    match mss_offsets(&before) {
        None => assert!(!changed, "changed a packet that is no consistent SYN"),
        Some((ihl, total, at)) => {
            let checksum = ihl + 16..ihl + 18;
            for (i, (&b, &a)) in before.iter().zip(&pkt).enumerate() {
                if b != a {
                    assert!(checksum.contains(&i) || at.iter().any(|&m| i == m || i == m + 1), "byte {i} changed");
                }
            }
            for m in at {
                assert_eq!(be16(&pkt, m), be16(&before, m).min(max), "mss at {m}");
            }
            assert_eq!(tcp_v4_sum(&pkt, ihl, total), tcp_v4_sum(&before, ihl, total), "tcp checksum");
        }
    }
    let once = pkt.clone();
    assert!(!clamp_tcp_mss(&mut pkt, max), "a second clamp changed it");
    assert_eq!(pkt, once);
});
