//! ARP over Ethernet for IPv4 (RFC 826), as far as a VIP's owner needs it: read a request,
//! write the reply, write a gratuitous announcement (RFC 5227 §3).
//!
//! Frames are whole Ethernet frames (14-byte header, no VLAN tag: an `AF_PACKET` socket on the
//! interface sees them untagged), as read from and written to a raw packet socket.

use std::net::Ipv4Addr;

/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Length of an Ethernet + ARP-for-IPv4 frame, without padding.
pub const FRAME_LEN: usize = 14 + 28;
const BROADCAST: [u8; 6] = [0xff; 6];
const OP_REQUEST: u16 = 1;
const OP_REPLY: u16 = 2;

/// A MAC address.
pub type Mac = [u8; 6];

/// An ARP request: "who has `target_ip`? tell `sender_ip` at `sender_mac`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

/// Why a frame is not an ARP request this module answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArpError {
    #[error("shorter than an Ethernet ARP frame")]
    Truncated,
    #[error("not ARP")]
    NotArp,
    #[error("not Ethernet/IPv4 ARP")]
    NotIpv4OverEthernet,
    #[error("not a request")]
    NotRequest,
    #[error("sender MAC is broadcast or multicast")]
    BadSender,
}

/// Parses an Ethernet frame holding an ARP request. Anything else is an error that says why;
/// the caller counts it. Gratuitous requests (sender IP = target IP) parse too: the caller
/// decides whether they need an answer (they never do).
pub fn parse_request(frame: &[u8]) -> Result<Request, ArpError> {
    if frame.len() < FRAME_LEN {
        return Err(ArpError::Truncated);
    }
    if u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_ARP {
        return Err(ArpError::NotArp);
    }
    let arp = &frame[14..FRAME_LEN];
    // hardware type 1 (Ethernet), protocol 0x0800, hardware length 6, protocol length 4
    if arp[..6] != [0, 1, 8, 0, 6, 4] {
        return Err(ArpError::NotIpv4OverEthernet);
    }
    if u16::from_be_bytes([arp[6], arp[7]]) != OP_REQUEST {
        return Err(ArpError::NotRequest);
    }
    let mac = |at: usize| -> Mac { arp[at..at + 6].try_into().unwrap_or_default() };
    let ip = |at: usize| Ipv4Addr::new(arp[at], arp[at + 1], arp[at + 2], arp[at + 3]);
    let sender_mac = mac(8);
    // A multicast bit in the sender is a forgery or garbage: answering would flood.
    if sender_mac[0] & 1 == 1 {
        return Err(ArpError::BadSender);
    }
    Ok(Request { sender_mac, sender_ip: ip(14), target_ip: ip(24) })
}

/// The reply to `request`: "`ip` is at `mac`", sent to the asker alone.
pub fn reply(mac: Mac, ip: Ipv4Addr, request: &Request) -> [u8; FRAME_LEN] {
    frame(request.sender_mac, OP_REPLY, mac, ip, request.sender_mac, request.sender_ip)
}

/// A gratuitous ARP request for `ip` from `mac`, to everyone: sender and target address are
/// both `ip`, so every host that holds an entry for `ip` updates it, and no host answers.
pub fn gratuitous(mac: Mac, ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    frame(BROADCAST, OP_REQUEST, mac, ip, [0; 6], ip)
}

fn frame(dst: Mac, op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa.octets());
    f[32..38].copy_from_slice(&tha);
    f[38..42].copy_from_slice(&tpa.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Mac = [2, 0, 0, 0, 0, 1];
    const CLIENT: Mac = [2, 0, 0, 0, 0, 9];
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);

    fn request(target: Ipv4Addr) -> [u8; FRAME_LEN] {
        frame(BROADCAST, OP_REQUEST, CLIENT, CLIENT_IP, [0; 6], target)
    }

    #[test]
    fn a_request_parses_and_its_reply_goes_to_the_asker() {
        let req = parse_request(&request(VIP)).unwrap();
        assert_eq!(req, Request { sender_mac: CLIENT, sender_ip: CLIENT_IP, target_ip: VIP });
        let r = reply(ME, VIP, &req);
        assert_eq!(&r[..6], &CLIENT, "unicast to the asker");
        assert_eq!(&r[20..22], &[0, 2], "a reply");
        assert_eq!(&r[22..28], &ME);
        assert_eq!(&r[28..32], &VIP.octets());
        assert_eq!(&r[32..38], &CLIENT);
        assert_eq!(&r[38..42], &CLIENT_IP.octets());
        // A reply is not a request.
        assert_eq!(parse_request(&r), Err(ArpError::NotRequest));
    }

    #[test]
    fn a_gratuitous_request_names_the_vip_twice_and_is_broadcast() {
        let g = gratuitous(ME, VIP);
        assert_eq!(&g[..6], &BROADCAST);
        let parsed = parse_request(&g).unwrap();
        assert_eq!((parsed.sender_ip, parsed.target_ip, parsed.sender_mac), (VIP, VIP, ME));
    }

    #[test]
    fn other_frames_are_refused_with_their_reason() {
        let good = request(VIP);
        assert_eq!(parse_request(&good[..41]), Err(ArpError::Truncated));
        let mut ipv4 = good;
        ipv4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(parse_request(&ipv4), Err(ArpError::NotArp));
        let mut ipv6 = good;
        ipv6[16..18].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(parse_request(&ipv6), Err(ArpError::NotIpv4OverEthernet));
        let mut multicast = good;
        multicast[22] = 1;
        assert_eq!(parse_request(&multicast), Err(ArpError::BadSender));
        // Padding to the Ethernet minimum (60 bytes) is fine.
        let mut padded = good.to_vec();
        padded.resize(60, 0);
        assert!(parse_request(&padded).is_ok());
    }
}
