//! ringlb's data plane: the IO around `ringlb-core`.
//!
//! - [`steering`]: `ringlb setup` / `teardown`: sysctls, the VIP on `lo`, the policy rule that
//!   sends VIP traffic arriving on the underlay into the TUN; all recorded and restored.
//! - [`tun`]: the daemon-owned TUN device and the route into it.
//! - [`carrier`]: the two ways to reach a peer: IP-in-UDP (default, no privilege) and RFC 2003
//!   IP-in-IP on a raw socket.
//! - [`driver`]: the loop that reads packets, asks the core, and carries out its verdicts.
//! - [`announce`]: telling the network this node takes VIP traffic: a route for a routing
//!   daemon to export (BGP), or ARP answers and gratuitous ARP (L2).
//! - [`kernel_drops`]: packets the kernel dropped before the daemon read them (the TUN's queue,
//!   the carrier socket's buffer), so overload shows apart from loss.
//! - [`sockets`]: the TCP connections the kernel already serves on the VIP, which a starting
//!   daemon pins to this node.
//!
//! Deliberately not here: decisions (they are the core's), config parsing and the CLI (the
//! binary's). This is the only crate with `unsafe`, and only for socket calls socket2 lacks.

pub mod announce;
pub mod carrier;
pub mod driver;
pub mod kernel_drops;
pub mod offload;
pub mod sockets;
pub mod steering;
pub mod tun;

pub use carrier::{Carrier, CarrierKind};
pub use driver::{Driver, DriverHandle, MemberSnapshot, NodeUpdate, Sealing, Snapshot, SnapshotRequests, Stop};
pub use kernel_drops::KernelDrops;
pub use offload::{Offload, OffloadSnapshot};
