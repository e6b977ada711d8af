//! `finish_partial_checksum` on arbitrary bytes: it never panics; when it changes a packet it
//! changes only the TCP or UDP checksum field, the result verifies, and a second call changes
//! nothing.
#![no_main]

use etherparse::{Ipv4Slice, TcpSlice, UdpSlice};
use libfuzzer_sys::fuzz_target;
use ringlb_fuzz::{fix_ip_length, fix_ipv4_header};
use ringlb_wire::finish_partial_checksum;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, bytes)) = data.split_first() else { return };
    let mut pkt = bytes.to_vec();
    if shape & 1 != 0 {
        fix_ip_length(&mut pkt);
    }
    if shape & 2 != 0 {
        fix_ipv4_header(&mut pkt);
    }
    let before = pkt.clone();
    if !finish_partial_checksum(&mut pkt) {
        assert_eq!(pkt, before, "changed a packet it says it left alone");
        return;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let at = ihl + if pkt[9] == 6 { 16 } else { 6 };
    for (i, (a, b)) in pkt.iter().zip(&before).enumerate() {
        assert!(a == b || i == at || i == at + 1, "byte {i} changed outside the checksum field");
    }
    if let Ok(ip) = Ipv4Slice::from_slice(&pkt) {
        let (src, dst) = (ip.header().source(), ip.header().destination());
        let payload = ip.payload().payload;
        match pkt[9] {
            6 => {
                if let Ok(tcp) = TcpSlice::from_slice(payload) {
                    assert_eq!(tcp.calc_checksum_ipv4(src, dst).ok(), Some(tcp.checksum()), "TCP checksum wrong");
                }
            }
            _ => {
                if let Ok(udp) = UdpSlice::from_slice(payload) {
                    let sum = udp.to_header().calc_checksum_ipv4_raw(src, dst, udp.payload()).ok();
                    assert_eq!(sum, Some(udp.checksum()), "UDP checksum wrong");
                }
            }
        }
    }
    let once = pkt.clone();
    finish_partial_checksum(&mut pkt);
    assert_eq!(pkt, once, "a second call changed the packet");
});
