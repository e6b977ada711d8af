//! ringlb's sans-IO core: everything that decides, nothing that touches the world.
//!
//! A [`Node`] answers each packet with a [`Verdict`] (deliver locally, forward to a peer, or
//! drop with a [`DropReason`]) and keeps the [`FlowTable`] that pins a connection to the node
//! chosen for its first packet. New flows are placed by a [`Policy`] over a view of the
//! members and their load.
//!
//! Deliberately not here: sockets, TUN devices, clocks, threads, hidden randomness. Time comes
//! in as a [`Timestamp`] argument and randomness from a seeded [`Rng`] held in the state, so a
//! whole cluster of cores can run inside one deterministic test.
#![forbid(unsafe_code)]

pub mod cluster;
mod counters;
mod directory;
pub mod entry;
mod flow_table;
pub mod health;
mod members;
mod node;
mod placement;
mod rng;
pub mod seal;
pub mod sites;
mod time;

pub use cluster::{
    ClientFlow, Cluster, ClusterConfig, FlowMessage, Identity, Outcome, Peer, Refusal, Transmit, Update,
};
pub use counters::{Counters, DropReason};
pub use flow_table::{FlowConfig, FlowState, FlowTable, Insert, PlacedBy};
pub use members::{LoadReport, LocalLoad, Member, MemberState, Members, MembersError, NodeId};
pub use node::{
    FailurePolicy, FlowsNeedingDaemon, Node, NodeConfig, OffloadCounters, OffloadOp, OffloadUsage, Offloaded,
    RecoveryConfig, Verdict,
};
pub use placement::{Candidate, Placement, Policy};
pub use rng::Rng;
pub use time::Timestamp;
