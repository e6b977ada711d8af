//! The packet loop: read from the TUN and the carrier, ask the core, carry out its verdict.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ringlb_core::{Counters, DropReason, MemberState, Node, Timestamp, Verdict};
use tokio::sync::{mpsc, oneshot, watch};
use tun_rs::AsyncDevice;

use crate::carrier::{Carrier, RecvError};
use crate::tun::{is_transient, MAX_PACKET};

/// How often idle flows are expired.
const TICK: Duration = Duration::from_millis(250);

/// A copy of the node's state for the metrics and status endpoints. The packet loop makes one
/// when asked through a [`SnapshotRequests`] handle, so readers never share state with it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub counters: Counters,
    pub flows: usize,
    pub members: Vec<MemberSnapshot>,
}

#[derive(Debug, Clone)]
pub struct MemberSnapshot {
    pub name: String,
    pub addr: IpAddr,
    pub state: MemberState,
    pub weight: f64,
    pub is_local: bool,
    /// Flows this node has pinned to the member.
    pub flows: u32,
    /// Packets this node has forwarded to the member.
    pub forwarded_packets: u64,
}

fn snapshot(node: &Node) -> Snapshot {
    let local = node.config().local;
    Snapshot {
        counters: node.counters().clone(),
        flows: node.flows().len(),
        members: node
            .members()
            .iter()
            .map(|(id, m)| MemberSnapshot {
                name: m.name.clone(),
                addr: m.addr,
                state: m.state,
                weight: m.weight,
                is_local: id == local,
                flows: node.flows().flows_on(id),
                forwarded_packets: node.forwarded_to(id),
            })
            .collect(),
    }
}

/// Owns the core and the devices; see [`Driver::run`].
pub struct Driver {
    node: Node,
    tun: AsyncDevice,
    carrier: Carrier,
    origin: Instant,
    requests: mpsc::Receiver<oneshot::Sender<Snapshot>>,
    updates: mpsc::Receiver<NodeUpdate>,
    load: watch::Sender<NodeLoad>,
}

/// A change to apply to the core between packets (members, loads, drain), from the control
/// plane. A closure keeps this crate free of the control plane's types.
pub type NodeUpdate = Box<dyn FnOnce(&mut Node, Timestamp) + Send>;

/// This node's own load, published every tick for the control plane's load vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    pub served_flows: u32,
    /// Monotonic count of new flows served.
    pub served_new_flows: u64,
}

/// How the rest of the process talks to a running [`Driver`].
#[derive(Debug)]
pub struct DriverHandle {
    pub snapshots: SnapshotRequests,
    pub updates: mpsc::Sender<NodeUpdate>,
    pub load: watch::Receiver<NodeLoad>,
}

/// Asks the packet loop for a fresh [`Snapshot`].
#[derive(Debug, Clone)]
pub struct SnapshotRequests(mpsc::Sender<oneshot::Sender<Snapshot>>);

impl SnapshotRequests {
    /// `None` when the packet loop has stopped.
    pub async fn get(&self) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).await.ok()?;
        rx.await.ok()
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("node", &self.node).field("carrier", &self.carrier).finish_non_exhaustive()
    }
}

enum Event {
    Tun(io::Result<usize>),
    Carrier(Result<crate::carrier::Received, RecvError>),
    Tick,
    Snapshot(oneshot::Sender<Snapshot>),
    Update(NodeUpdate),
}

impl Driver {
    pub fn new(node: Node, tun: AsyncDevice, carrier: Carrier) -> (Self, DriverHandle) {
        let (tx, rx) = mpsc::channel(16);
        let (up_tx, up_rx) = mpsc::channel(1024);
        let (load_tx, load_rx) = watch::channel(NodeLoad::default());
        let driver = Driver { node, tun, carrier, origin: Instant::now(), requests: rx, updates: up_rx, load: load_tx };
        (driver, DriverHandle { snapshots: SnapshotRequests(tx), updates: up_tx, load: load_rx })
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.origin.elapsed())
    }

    /// Runs until `shutdown` completes or the TUN fails for good.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let mut tun_buf = vec![0u8; MAX_PACKET];
        let mut carrier_buf = vec![0u8; MAX_PACKET];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            let event = tokio::select! {
                r = self.tun.recv(&mut tun_buf) => Event::Tun(r),
                r = self.carrier.recv(&mut carrier_buf) => Event::Carrier(r),
                _ = tick.tick() => Event::Tick,
                Some(reply) = self.requests.recv() => Event::Snapshot(reply),
                Some(update) = self.updates.recv() => Event::Update(update),
                () = &mut shutdown => break,
            };
            match event {
                Event::Tun(Ok(n)) => self.on_tun_packet(&mut tun_buf[..n]).await,
                Event::Tun(Err(e)) if is_transient(&e) => {}
                Event::Tun(Err(e)) => return Err(e),
                Event::Carrier(Ok(rx)) => {
                    let now = self.now();
                    let verdict = self.node.on_carrier_packet(now, rx.from, &carrier_buf[rx.inner.clone()]);
                    tracing::trace!(from = %rx.from, len = rx.inner.len(), ?verdict, "carrier packet");
                    if verdict == Verdict::Deliver {
                        self.deliver(&carrier_buf[rx.inner]).await;
                    }
                }
                Event::Carrier(Err(RecvError::Malformed(reason))) => {
                    tracing::trace!(?reason, "malformed carrier packet");
                    self.node.count_drop(DropReason::BadCarrierHeader);
                }
                Event::Carrier(Err(RecvError::Io(e))) => {
                    if !is_transient(&e) {
                        tracing::debug!(error = %e, "carrier receive error");
                    }
                }
                Event::Tick => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                    self.load.send_replace(NodeLoad {
                        served_flows: u32::try_from(self.node.served_flows()).unwrap_or(u32::MAX),
                        served_new_flows: self.node.counters().served_new_flows,
                    });
                }
                Event::Update(update) => {
                    let now = self.now();
                    update(&mut self.node, now);
                }
                Event::Snapshot(reply) => {
                    let _ = reply.send(snapshot(&self.node));
                }
            }
        }
        Ok(())
    }

    async fn on_tun_packet(&mut self, pkt: &mut [u8]) {
        let now = self.now();
        let verdict = self.node.on_tun_packet(now, pkt);
        tracing::trace!(len = pkt.len(), ?verdict, "tun packet");
        match verdict {
            Verdict::Deliver => self.deliver(pkt).await,
            Verdict::Forward { addr, flow_hash, .. } => {
                if let Err(e) = self.carrier.send(addr, flow_hash, pkt).await {
                    let reason = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                        DropReason::TooBig
                    } else {
                        DropReason::CarrierSendError
                    };
                    tracing::trace!(error = %e, %addr, "carrier send failed");
                    self.node.count_drop(reason);
                }
            }
            Verdict::Drop(_) => {}
        }
    }

    /// Hands a packet to the local kernel by writing it into the TUN.
    async fn deliver(&mut self, pkt: &[u8]) {
        if let Err(e) = self.tun.send(pkt).await {
            tracing::trace!(error = %e, "tun write failed");
            self.node.count_drop(DropReason::TunWriteError);
        }
    }
}
