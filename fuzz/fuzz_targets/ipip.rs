//! RFC 2003 decapsulation of arbitrary bytes: the inner range it returns lies inside the
//! buffer, after an outer header that says IPv4, IP-in-IP and that length. Encapsulation of
//! arbitrary inner bytes writes a valid outer header, and decapsulation gives back the same
//! sender and inner bytes, link-layer padding or not.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use ringlb_fuzz::{be16, ipv4_header_ok};
use ringlb_wire::ipip::{decap, write_outer, IPPROTO_IPIP, OUTER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok((src, inner)) = decap(data) {
        let ihl = usize::from(data[0] & 0x0f) * 4;
        assert!(inner.start <= inner.end && inner.end <= data.len(), "{inner:?} outside {} bytes", data.len());
        assert_eq!((inner.start, inner.end), (ihl, usize::from(be16(data, 2))));
        assert!(ihl >= OUTER_LEN && data[0] >> 4 == 4 && data[9] == IPPROTO_IPIP);
        assert_eq!(src, Ipv4Addr::new(data[12], data[13], data[14], data[15]));
    }

    if data.len() < 10 {
        return;
    }
    let src = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
    let dst = Ipv4Addr::new(data[4], data[5], data[6], data[7]);
    let (ttl, padding, inner) = (data[8], usize::from(data[9] % 8), &data[10..]);
    let mut outer = [0u8; OUTER_LEN];
    write_outer(&mut outer, src, dst, inner.len(), ttl).expect("fits in 64 KiB");
    assert!(ipv4_header_ok(&outer), "outer header checksum");
    assert_eq!((be16(&outer, 2), outer[8], outer[9]), (u16::try_from(OUTER_LEN + inner.len()).unwrap(), ttl, 4));
    assert_eq!((&outer[12..16], &outer[16..20]), (&src.octets()[..], &dst.octets()[..]));
    let mut pkt = outer.to_vec();
    pkt.extend_from_slice(inner);
    pkt.resize(pkt.len() + padding, 0);
    let (from, range) = decap(&pkt).expect("decap of what encap wrote");
    assert_eq!(from, src);
    assert_eq!(&pkt[range], inner);

    // Lengths beyond one IPv4 packet are refused, not wrapped.
    let long = usize::from(be16(data, 8)) * 4;
    assert_eq!(write_outer(&mut outer, src, dst, long, ttl).is_some(), long + OUTER_LEN <= 65_535);
});
