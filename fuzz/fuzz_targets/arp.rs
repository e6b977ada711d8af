//! ARP parsing of arbitrary frames (what the layer-2 owner's packet socket reads): a request
//! that parses says what the bytes say, and its reply goes back to the asker alone with the
//! owner's address; the reply and a gratuitous announcement parse back as what they are.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use ringlb_wire::arp::{gratuitous, parse_request, reply, ArpError, FRAME_LEN};

const OWNER: [u8; 6] = [2, 0, 0, 0, 0, 1];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        assert!(data.len() >= FRAME_LEN);
        assert_eq!(&data[12..14], &[8, 6]);
        assert_eq!(&data[20..22], &[0, 1], "a request");
        assert_eq!(req.sender_mac[..], data[22..28]);
        assert_eq!(req.sender_mac[0] & 1, 0, "never a multicast sender");
        assert_eq!(req.sender_ip.octets()[..], data[28..32]);
        assert_eq!(req.target_ip.octets()[..], data[38..42]);
        let r = reply(OWNER, VIP, &req);
        assert_eq!(r[..6], req.sender_mac, "unicast to the asker");
        assert_eq!(parse_request(&r), Err(ArpError::NotRequest));
        assert_eq!(&r[22..28], &OWNER);
    }
    if data.len() >= 4 {
        let ip = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
        let g = parse_request(&gratuitous(OWNER, ip)).expect("a gratuitous request parses");
        assert_eq!((g.sender_mac, g.sender_ip, g.target_ip), (OWNER, ip, ip));
    }
});
