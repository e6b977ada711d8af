//! The TUN device that VIP traffic is routed into.
//!
//! Two ways to get one:
//! - [`open`]: the daemon creates it (non-persistent, needs CAP_NET_ADMIN) and routes into it;
//!   it vanishes with the daemon, and with it the route.
//! - [`create_persistent`] (`ringlb setup`, as root) then [`attach`] (`ringlb node`, as the
//!   device's owner with no capability): the device, its address, MTU and route outlive the
//!   daemon, and `ignore_routes_with_linkdown` keeps fail-open: a TUN with no reader has no
//!   carrier, the kernel ignores the route into it, and VIP traffic falls through to local
//!   delivery.

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
    let dev = create(name, mtu, vip)?;
    configure(name, table)?;
    Ok(dev)
}

fn create(name: &str, mtu: u16, vip: IpAddr) -> Result<AsyncDevice, SteeringError> {
    builder(name, mtu, vip)?
        .build_async()
        .map_err(|source| SteeringError::Io { path: format!("/dev/net/tun ({name})").into(), source })
}

fn builder(name: &str, mtu: u16, vip: IpAddr) -> Result<DeviceBuilder, SteeringError> {
    let IpAddr::V4(vip4) = vip else { return Err(SteeringError::Ipv6(vip)) };
    Ok(DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .ipv4(vip4, 32, None)
        .tx_queue_len(10_000)
        .offload(true)
        // Up only once IPv6 is off on it, or the kernel's first IPv6 packets reach the TUN.
        .enable(false))
}

fn configure(name: &str, table: u32) -> Result<(), SteeringError> {
    // Written only when it differs: in a container /proc/sys is read-only, and setup may have
    // set it already.
    let rp_filter = format!("net/ipv4/conf/{name}/rp_filter");
    if crate::steering::read_sysctl(&rp_filter).ok().as_deref() != Some("2") {
        write_sysctl(&rp_filter, "2")?;
    }
    let _ = write_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&["link", "set", name, "up"])?;
    ip(&["route", "replace", "default", "dev", name, "table", &table.to_string()])?;
    Ok(())
}

/// Creates (or reconfigures) a persistent TUN owned by `owner`, with its address, MTU and the
/// route of `table` into it; the kernel ignores that route while no process reads the device.
/// Needs CAP_NET_ADMIN; the owner then [`attach`]es with none.
pub fn create_persistent(name: &str, mtu: u16, vip: IpAddr, table: u32, owner: u32) -> Result<(), SteeringError> {
    let IpAddr::V4(vip4) = vip else { return Err(SteeringError::Ipv6(vip)) };
    let owner_s = owner.to_string();
    match persistent_owner(name)? {
        Some(o) if o == owner_s => {}
        Some(o) if o.is_empty() => return Err(SteeringError::NotOurTun(name.to_owned(), "it is not a TUN device")),
        Some(o) if o == "-1" => {
            return Err(SteeringError::NotOurTun(
                name.to_owned(),
                "a daemon without tun.owner holds it; stop that daemon first",
            ))
        }
        Some(_) => {
            // Made for another user: made again (a daemon of that user would lose it anyway).
            ip(&["link", "del", name])?;
            ip(&["tuntap", "add", "dev", name, "mode", "tun", "vnet_hdr", "user", &owner_s])?;
        }
        None => drop(ip(&["tuntap", "add", "dev", name, "mode", "tun", "vnet_hdr", "user", &owner_s])?),
    }
    // Configured through netlink only, never opened: a daemon may be attached to it right now
    // (setup is idempotent and may run again), and a second open would disturb it.
    ip(&["link", "set", "dev", name, "mtu", &mtu.to_string(), "txqueuelen", "10000"])?;
    ip(&["addr", "replace", &format!("{vip4}/32"), "dev", name])?;
    write_sysctl(&format!("net/ipv4/conf/{name}/ignore_routes_with_linkdown"), "1")?;
    configure(name, table)
}

/// The owner uid of the TUN `name` as sysfs gives it (`-1`: none; empty: not a TUN), `None` when
/// there is no such device. (Not `ip -d`: it shows the owner's name, not its uid.)
fn persistent_owner(name: &str) -> Result<Option<String>, SteeringError> {
    let dir = std::path::Path::new("/sys/class/net").join(name);
    if !dir.exists() {
        return Ok(None);
    }
    if !dir.join("tun_flags").exists() {
        return Ok(Some(String::new()));
    }
    Ok(Some(std::fs::read_to_string(dir.join("owner")).map(|s| s.trim().to_owned()).unwrap_or_default()))
}

/// Attaches to the persistent TUN `name` made by [`create_persistent`]; needs no capability
/// when this process runs as its owner (and may open `/dev/net/tun`).
pub fn attach(name: &str) -> Result<AsyncDevice, SteeringError> {
    if !std::path::Path::new("/sys/class/net").join(name).exists() {
        return Err(SteeringError::NoTun(name.to_owned()));
    }
    DeviceBuilder::new()
        .name(name)
        .offload(true)
        .inherit_enable_state()
        .build_async()
        .map_err(|source| SteeringError::Io { path: format!("/dev/net/tun ({name})").into(), source })
}

/// Largest packet the TUN hands over (a GSO super-packet), not counting the virtio-net header.
pub const MAX_PACKET: usize = 65_535;

pub use tun_rs::VIRTIO_NET_HDR_LEN;

pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}
