//! Checksums a sender left to offload.
//!
//! A packet that left its sender's kernel through a virtual device (veth, a container's
//! interface) may still carry a *partial* TCP or UDP checksum: the field holds only the sum of
//! the pseudo-header, and the kernel (`CHECKSUM_PARTIAL`) relies on a device to finish it,
//! which a veth never does. Such a packet is fine as long as it stays one kernel object, as it
//! does when the kernel fast path encapsulates it and the peer's fast path decapsulates it. When
//! its bytes reach user space instead (a peer's carrier socket, before the peer offloaded the
//! flow), that knowledge is lost, and the peer's kernel would drop the packet as corrupt once the
//! daemon hands it back. The daemon therefore finishes such checksums, as the device would have.

/// Finishes the TCP or UDP checksum of an IPv4 packet if it holds only the pseudo-header sum
/// (see the module documentation); returns whether it did.
///
/// A complete checksum that happens to equal the pseudo-header sum (one packet in 65,536) is
/// replaced by the same complete checksum: harmless.
pub fn finish_partial_checksum(pkt: &mut [u8]) -> bool {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    // Unfragmented only: a fragment's checksum covers the whole datagram.
    let fragment = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0;
    if ihl < 20 || total < ihl || total > pkt.len() || fragment {
        return false;
    }
    let offset = match pkt[9] {
        6 => 16,
        17 => 6,
        _ => return false,
    };
    // TCP covers the IP payload; UDP what its own length field says (the pseudo-header uses it).
    let mut end = total;
    if pkt[9] == 17 {
        let Some(len) = pkt.get(ihl + 4..ihl + 6) else { return false };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len < 8 || ihl + len > total {
            return false;
        }
        end = ihl + len;
    }
    let l4 = &pkt[ihl..end];
    if l4.len() < offset + 2 {
        return false;
    }
    let field = u16::from_be_bytes([l4[offset], l4[offset + 1]]);
    // UDP's 0 means "no checksum".
    if pkt[9] == 17 && field == 0 {
        return false;
    }
    let Ok(l4_len) = u16::try_from(l4.len()) else { return false };
    let mut sum = 0u32;
    for word in pkt[12..20].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    sum += u32::from(pkt[9]) + u32::from(l4_len);
    let pseudo = fold(sum);
    if field != pseudo {
        return false;
    }
    let l4 = &mut pkt[ihl..end];
    l4[offset] = 0;
    l4[offset + 1] = 0;
    let mut sum = u32::from(pseudo);
    let mut words = l4.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    let mut check = !fold(sum);
    if pkt[9] == 17 && check == 0 {
        check = 0xffff;
    }
    pkt[ihl + offset..ihl + offset + 2].copy_from_slice(&check.to_be_bytes());
    true
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 0xffff.
    #[allow(clippy::cast_possible_truncation)]
    let folded = sum as u16;
    folded
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn tcp_packet(payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([10, 78, 0, 100], [10, 200, 0, 10], 64).tcp(40000, 80, 7, 64000).ack(1).psh();
        let mut out = Vec::new();
        builder.write(&mut out, payload).unwrap();
        out
    }

    fn checksum_ok(pkt: &[u8]) -> bool {
        let ip = etherparse::Ipv4Slice::from_slice(pkt).unwrap();
        let tcp = etherparse::TcpSlice::from_slice(ip.payload().payload).unwrap();
        let h = ip.header();
        tcp.calc_checksum_ipv4(h.source(), h.destination()).unwrap() == tcp.checksum()
    }

    /// What a kernel leaves for the device: the pseudo-header sum, not inverted.
    fn make_partial(pkt: &mut [u8]) {
        let total = u16::from_be_bytes([pkt[2], pkt[3]]);
        let mut sum = 0u32;
        for w in pkt[12..20].chunks_exact(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        sum += u32::from(pkt[9]) + u32::from(total - 20);
        pkt[36..38].copy_from_slice(&fold(sum).to_be_bytes());
    }

    #[test]
    fn a_partial_checksum_is_finished_and_a_complete_one_left_alone() {
        for payload in [&b""[..], b"GET / HTTP/1.1\r\n\r\n", b"odd"] {
            let good = tcp_packet(payload);
            assert!(checksum_ok(&good));
            let mut same = good.clone();
            assert!(!finish_partial_checksum(&mut same), "a complete checksum was touched");
            assert_eq!(same, good);

            let mut partial = good.clone();
            make_partial(&mut partial);
            assert!(!checksum_ok(&partial));
            assert!(finish_partial_checksum(&mut partial));
            assert_eq!(partial, good, "finished differently from a full computation");
        }
    }

    #[test]
    fn garbage_neither_panics_nor_changes() {
        let good = tcp_packet(b"x");
        for len in 0..good.len() {
            let mut cut = good[..len].to_vec();
            let before = cut.clone();
            finish_partial_checksum(&mut cut);
            assert_eq!(cut, before);
        }
    }
}
