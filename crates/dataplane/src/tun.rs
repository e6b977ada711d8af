//! The daemon-owned TUN device that VIP traffic is routed into.

use std::io;
use std::net::IpAddr;

use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::steering::{ip, write_sysctl, SteeringError};

/// Creates the TUN device (non-persistent: it vanishes with the process), then routes table
/// `table` into it. Needs CAP_NET_ADMIN.
///
/// The device carries the VIP as its address too: the kernel accepts a packet written into a
/// TUN only when loose reverse-path filtering can see an IPv4 address on it.
///
/// With the device's offload on (virtio-net header, TSO/USO), reads may return TCP or UDP
/// super-packets of up to 64 KiB behind a [`VIRTIO_NET_HDR_LEN`]-byte header, and every write
/// must carry such a header too: one read and one write then move what took forty.
pub fn open(name: &str, mtu: u16, vip: IpAddr, table: u32) -> Result<AsyncDevice, SteeringError> {
    let IpAddr::V4(vip4) = vip else { return Err(SteeringError::Ipv6(vip)) };
    let dev = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .ipv4(vip4, 32, None)
        .tx_queue_len(10_000)
        .offload(true)
        // Up only once IPv6 is off on it, or the kernel's first IPv6 packets reach the TUN.
        .enable(false)
        .build_async()
        .map_err(|source| SteeringError::Io { path: format!("/dev/net/tun ({name})").into(), source })?;
    write_sysctl(&format!("net/ipv4/conf/{name}/rp_filter"), "2")?;
    let _ = write_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&["link", "set", name, "up"])?;
    ip(&["route", "replace", "default", "dev", name, "table", &table.to_string()])?;
    Ok(dev)
}

/// Largest packet the TUN hands over (a GSO super-packet), not counting the virtio-net header.
pub const MAX_PACKET: usize = 65_535;

pub use tun_rs::VIRTIO_NET_HDR_LEN;

pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}
