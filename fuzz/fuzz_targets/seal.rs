//! The sealed carrier's receiver fed arbitrary datagrams from a member's address, between real
//! sealed packets of that member: it never panics, never accepts what the sender did not seal,
//! and every real packet still opens exactly once.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ringlb_core::seal::{CarrierKeys, Direction, SealConfig, Secret, OVERHEAD};
use ringlb_core::Timestamp;

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

fuzz_target!(|data: &[u8]| {
    let config = SealConfig { key_lifetime: Duration::from_secs(5), ..SealConfig::default() };
    let (mut a, mut b) = (CarrierKeys::new(config), CarrierKeys::new(config));
    a.install(Timestamp::ZERO, "b", Direction::Send, Secret([7; 32]));
    a.bind("b", B);
    b.install(Timestamp::ZERO, "a", Direction::Receive, Secret([7; 32]));
    b.bind("a", A);
    let mut now = Timestamp::ZERO;
    // Each chunk: one byte of time (0 to 2.55 s), then a datagram from a's address.
    for (i, chunk) in data.split(|&b| b == 0xff).enumerate() {
        let Some((&step, rest)) = chunk.split_first() else { continue };
        now = now.saturating_add(Duration::from_millis(u64::from(step) * 10));
        let mut forged = rest.to_vec();
        if let Ok(n) = b.open(now, A, &mut forged) {
            // Only a's own packets open: nothing else knows the secret.
            panic!("a made-up datagram of {} bytes opened ({n} bytes inside)", rest.len());
        }
        let pkt = [0x45, u8::try_from(i % 256).unwrap_or(0), 1, 2, 3];
        let mut out = vec![0u8; pkt.len() + OVERHEAD];
        let sealed = a.seal(now, B, &pkt, pkt.len(), &mut out).expect("a has a key for b");
        let mut copy = out[..sealed].to_vec();
        let n = b.open(now, A, &mut out[..sealed]).expect("a real packet opens");
        assert_eq!(&out[16..16 + n], &pkt);
        assert!(b.open(now, A, &mut copy).is_err(), "a replay opened");
    }
});
