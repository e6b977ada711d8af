//! ringlb's wire formats: what a packet on the TUN or the carrier means.
//!
//! - [`classify`] turns an inner IP packet into a [`PacketMeta`] (flow key, TCP flags), or a
//!   [`MalformedReason`] saying why it is not a packet ringlb can route.
//! - [`ipip`] writes and strips the outer IPv4 header of RFC 2003 IP-in-IP.
//! - [`arp`] reads ARP requests and writes replies and gratuitous announcements for the VIP's
//!   layer-2 owner.
//! - [`clamp_tcp_mss`] lowers every MSS option of a SYN in place and fixes the checksum.
//!
//! This crate does no IO and allocates nothing; it only reads and writes caller buffers.
//! It knows nothing of nodes or policy: that is `ringlb-core`.
#![forbid(unsafe_code)]

pub mod arp;
pub mod build;
mod classify;
pub mod ipip;
mod mss;
mod partial;

#[cfg(fuzzing)]
pub use classify::classify_paths;
pub use classify::{
    classify, mix64, FlowKey, MalformedReason, PacketMeta, TcpFlags, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, L4,
};
pub use mss::clamp_tcp_mss;
pub use partial::finish_partial_checksum;

/// Bytes the UDP carrier adds in front of the inner packet (outer IPv4 + UDP header).
pub const UDP_CARRIER_OVERHEAD: u16 = 28;
/// Bytes the IP-in-IP carrier adds in front of the inner packet (outer IPv4 header).
pub const IPIP_CARRIER_OVERHEAD: u16 = 20;

/// RFC 1071 one's-complement sum helpers shared by the header writers.
pub(crate) mod checksum {
    /// Adds `data` as big-endian 16-bit words to `sum`.
    pub(crate) fn add(mut sum: u32, data: &[u8]) -> u32 {
        let mut chunks = data.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
        sum
    }

    /// Folds a 32-bit accumulator into the final 16-bit one's-complement checksum.
    pub(crate) fn finish(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        // The loop leaves at most 16 bits.
        !u16::try_from(sum).unwrap_or(u16::MAX)
    }
}
