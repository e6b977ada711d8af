//! Builders of well-formed IPv4 packets, for tests and for tools that inject packets.
//!
//! Not used on the data path.

/// Recomputes the IPv4 header checksum of `pkt` after an edit.
pub fn fix_ipv4_checksum(pkt: &mut [u8]) {
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    pkt[10] = 0;
    pkt[11] = 0;
    let sum = crate::checksum::finish(crate::checksum::add(0, &pkt[..ihl]));
    pkt[10..12].copy_from_slice(&sum.to_be_bytes());
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).expect("test packet fits in 64 KiB");
    let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    fix_ipv4_checksum(&mut p);
    p.extend_from_slice(l4);
    p
}

fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> u16 {
    let len = u16::try_from(l4.len()).expect("test packet fits in 64 KiB");
    let mut sum = crate::checksum::add(0, &src);
    sum = crate::checksum::add(sum, &dst);
    sum += u32::from(proto) + u32::from(len);
    crate::checksum::finish(crate::checksum::add(sum, l4))
}

/// A TCP segment with the given flags byte (0x02 = SYN) and TCP options.
pub fn tcp_v4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "tcp options are padded to 4 bytes");
    let doff = u8::try_from(5 + options.len() / 4).expect("at most 40 bytes of options");
    let mut t = Vec::with_capacity(20 + options.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes()); // seq
    t.extend_from_slice(&0u32.to_be_bytes()); // ack
    t.extend_from_slice(&[doff << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(options);
    let sum = l4_checksum(src, dst, 6, &t);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4(src, dst, 6, &t)
}

/// A UDP datagram.
pub fn udp_v4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("test packet fits in 64 KiB");
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let sum = l4_checksum(src, dst, 17, &u);
    u[6..8].copy_from_slice(&sum.to_be_bytes());
    ipv4(src, dst, 17, &u)
}

/// A UDP datagram over IPv6 (no extension headers).
pub fn udp_v6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("test packet fits in 64 KiB");
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    // Pseudo-header: addresses, upper-layer length, next header.
    let mut sum = crate::checksum::add(0, &p[8..40]);
    sum += u32::from(len) + 17;
    let sum = crate::checksum::finish(crate::checksum::add(sum, &p[40..]));
    p[46..48].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Checks the TCP checksum of an IPv4 packet: over its total length, as a receiver does
/// (bytes after it, such as link-layer padding, are not part of the segment). False when the
/// header lengths do not fit the buffer.
pub fn tcp_checksum_ok(pkt: &[u8]) -> bool {
    let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
    let total = pkt.get(2..4).map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if ihl < 20 || total < ihl || total > pkt.len() {
        return false;
    }
    let src = [pkt[12], pkt[13], pkt[14], pkt[15]];
    let dst = [pkt[16], pkt[17], pkt[18], pkt[19]];
    l4_checksum(src, dst, 6, &pkt[ihl..total]) == 0
}
