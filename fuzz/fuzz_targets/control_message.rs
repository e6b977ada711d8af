//! Control messages from the network: whatever `decode` accepts, `encode` encodes (it refuses
//! nothing that `decode` lets through), within one datagram, and decoding that gives back the
//! same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb_core::cluster::message::{decode, encode, MAX_MESSAGE};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode(data) {
        let bytes = encode(&msg).unwrap_or_else(|e| panic!("decoded {msg:?} but cannot encode it: {e}"));
        assert!(bytes.len() <= MAX_MESSAGE, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes), Ok(msg));
    }
});
