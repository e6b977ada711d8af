//! ringlb's control plane: how nodes find each other, watch each other and share their load.
//!
//! - [`certs`]: the cluster CA and short-lived node certificates (`ringlb cert ...`).
//! - [`tls`]: rustls configurations for mutual TLS: a peer must present a certificate that
//!   chains to the cluster CA, and outgoing connections check the peer's node name.
//! - [`driver`]: the QUIC endpoint (quinn) that carries the datagrams of `ringlb-core`'s
//!   cluster state machine, with the handshake and rate bounds of the transport, and reports
//!   members and loads to the data plane.
//!
//! Deliberately not here: the cluster's rules (membership, failure detection, who may say
//! what: `ringlb_core::cluster`, sans-IO) and the message encoding
//! (`ringlb_core::cluster::message`).
#![forbid(unsafe_code)]

pub mod certs;
pub mod driver;
pub mod tls;

pub use driver::{ControlConfig, ControlEvent, ControlHandle, Limits, PeerStatus, Reload};
