//! ringlb's control plane: how nodes find each other, watch each other and share their load.
//!
//! - [`certs`]: the cluster CA and short-lived node certificates (`ringlb cert ...`).
//! - [`tls`]: rustls configurations for mutual TLS: a peer must present a certificate that
//!   chains to the cluster CA, and outgoing connections check the peer's node name.
//! - [`driver`]: the QUIC endpoint (quinn) that carries `ringlb-core`'s membership messages and
//!   load vectors as datagrams, and reports members and loads to the data plane.
//!
//! Deliberately not here: the membership algorithm (it is `ringlb_core::membership`, sans-IO)
//! and the message encoding (`ringlb_wire::control`).
#![forbid(unsafe_code)]

pub mod certs;
pub mod driver;
pub mod tls;

pub use driver::{ControlConfig, ControlEvent, ControlHandle, PeerStatus, Refusals, Transitions};
