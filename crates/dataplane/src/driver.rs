//! The packet loop: read from the TUN and the carrier, ask the core, carry out its verdict.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ringlb_core::seal::{self, CarrierKeys, Direction, OpenError, SealError, SealStats, Secret};
use ringlb_core::{
    Counters, DropReason, FlowMessage, FlowsNeedingDaemon, LocalLoad, MemberState, Node, Timestamp, Verdict,
};
use tokio::sync::{mpsc, oneshot, watch};
use tun_rs::AsyncDevice;

use crate::carrier::{Carrier, Received, RecvError};
use crate::kernel_drops::KernelDropsReader;
use crate::tun::{is_transient, MAX_PACKET, VIRTIO_NET_HDR_LEN};
use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4};

const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

/// Completes a CHECKSUM_PARTIAL packet: the field at `start + offset` holds the pseudo-header
/// sum; the checksum covers everything from `start`. The caller has checked the bounds.
fn finish_checksum(pkt: &mut [u8], start: usize, offset: usize) {
    let at = start + offset;
    let initial = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
    pkt[at] = 0;
    pkt[at + 1] = 0;
    let sum = tun_rs::checksum(&pkt[start..], u64::from(initial));
    pkt[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
}

/// Reads taken from the TUN or the carrier per wakeup before the loop looks at other events.
const MAX_READS_PER_WAKEUP: usize = 32;
/// Most inner packets one carrier read returns (UDP GRO).
const MAX_SEGMENTS_PER_READ: usize = 64;

/// Headroom in front of each packet handed to the TUN's GRO: the virtio-net header goes there.
const GRO_HEADROOM: usize = 16;

/// Decapsulated packets waiting for one coalescing TUN write, and the GRO state; allocated
/// once, with room for each buffer to grow into a 64 KiB super-packet.
struct Coalesce {
    table: tun_rs::GROTable,
    bufs: Vec<Vec<u8>>,
}

impl Coalesce {
    fn new() -> Self {
        Coalesce {
            table: tun_rs::GROTable::default(),
            bufs: (0..2 * MAX_SEGMENTS_PER_READ).map(|_| Vec::with_capacity(GRO_HEADROOM + 65_536)).collect(),
        }
    }
}

/// Most segments one GSO super-packet is split into: 64 KiB in segments of at least 576 bytes
/// (the smallest TUN MTU ringlb accepts) is at most 114.
const MAX_SEGMENTS: usize = 128;

/// Room for the segments of one GSO super-packet, allocated once.
struct Segments {
    sizes: Vec<usize>,
    /// The segments back to back, for one batched send.
    joined: Vec<u8>,
}

impl Segments {
    fn new() -> Self {
        Segments { sizes: vec![0; MAX_SEGMENTS], joined: vec![0u8; 2 * 65_536] }
    }
}

/// Splits a GSO super-packet (`pkt`, after its virtio-net header `hdr`) straight into
/// `s.joined`, segment `i` at `i × stride`, so that the segments lie back to back for one UDP
/// GSO send without a second copy. Returns (segments, stride, bytes used).
fn split_joined(pkt: &mut [u8], mut hdr: VirtioNetHdr, s: &mut Segments) -> std::io::Result<(usize, usize, usize)> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
    let is_v6 = pkt.first().is_some_and(|b| b >> 4 == 6);
    // The kernel's hdr_len is the length of the skb's linear part, which may hold payload too;
    // the split needs the header length itself (as wireguard-go's offload also recomputes).
    let csum_start = usize::from(hdr.csum_start);
    let head = match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => {
            let doff = pkt.get(csum_start + 12).ok_or_else(|| invalid("tcp header beyond the packet"))? >> 4;
            csum_start + usize::from(doff) * 4
        }
        VIRTIO_NET_HDR_GSO_UDP_L4 => csum_start + 8,
        _ => usize::from(hdr.hdr_len),
    };
    hdr.hdr_len = u16::try_from(head).map_err(|_| invalid("header too long"))?;
    let (head, gso) = (usize::from(hdr.hdr_len), usize::from(hdr.gso_size));
    let stride = head + gso;
    let count = pkt.len().saturating_sub(head).div_ceil(gso.max(1));
    if gso == 0 || count == 0 || count > MAX_SEGMENTS || count * stride > s.joined.len() {
        return Err(invalid("super-packet does not fit the segment buffers"));
    }
    let mut chunks = s.joined.chunks_mut(stride);
    let mut slots: [&mut [u8]; MAX_SEGMENTS] = std::array::from_fn(|_| chunks.next().unwrap_or_default());
    let n = tun_rs::gso_split(pkt, hdr, &mut slots[..count], &mut s.sizes, 0, is_v6)?;
    if n == 0 || s.sizes[..n - 1].iter().any(|&z| z != stride) {
        return Err(invalid("segments of unequal size"));
    }
    Ok((n, stride, (n - 1) * stride + s.sizes[n - 1]))
}

/// Most segments of `stride` bytes (as sent: sealed ones included) that one UDP GSO send may
/// carry: the carrier's limit, and 65,000 bytes of payload (the kernel refuses more than 65,507
/// with EMSGSIZE, and the whole batch would be lost).
fn batch_for(max_batch: usize, stride: usize) -> usize {
    max_batch.min(65_000 / stride.max(1)).max(1)
}

/// How often idle flows are expired and flow-recovery messages go out (an entry that asked
/// a home learns the server within a tick and a round trip).
const TICK: Duration = Duration::from_millis(100);
/// Ticks between two samples of the kernel's drop counters (besides one per snapshot).
const KERNEL_DROPS_EVERY: u64 = 10;

/// A copy of the node's state for the metrics and status endpoints. The packet loop makes one
/// when asked through a [`SnapshotRequests`] handle, so readers never share state with it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub counters: Counters,
    pub flows: usize,
    /// Of those, flows no later packet has confirmed yet.
    pub flows_unconfirmed: usize,
    pub members: Vec<MemberSnapshot>,
    /// Once the daemon is stopping: the flows that still need it, as last counted.
    pub stopping: Option<FlowsNeedingDaemon>,
    /// Claims in this node's flow directory (flows whose home it is).
    pub directory: usize,
    /// The sealed carrier: packets sealed and opened, key rotations, sessions.
    pub seal: SealStats,
    /// Peers this node has a sealing key for.
    pub seal_peers: usize,
    /// Whether this entry spills new flows to other sites for load.
    pub spilling: bool,
    /// The kernel fast path, when it runs.
    pub fast_path: Option<crate::OffloadSnapshot>,
    /// Packets the kernel dropped before this daemon read them (overload, not loss).
    pub kernel_drops: crate::KernelDrops,
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
    /// New flows this node placed on the member.
    pub placed_flows: u64,
    pub site: String,
}

fn snapshot(node: &Node) -> Snapshot {
    let local = node.config().local;
    Snapshot {
        counters: node.counters().clone(),
        flows: node.flows().len(),
        flows_unconfirmed: node.flows().unconfirmed(),
        members: node
            .members()
            .iter()
            // Forgotten members keep their slot (flows may still point to it) but are nobody.
            .filter(|(_, m)| !m.is_removed())
            .map(|(id, m)| MemberSnapshot {
                name: m.name.clone(),
                addr: m.addr,
                state: m.state,
                weight: m.weight,
                is_local: id == local,
                flows: node.flows().flows_on(id),
                forwarded_packets: node.forwarded_to(id),
                placed_flows: node.placed_on(id),
                site: m.site.clone(),
            })
            .collect(),
        stopping: None,
        directory: node.directory_len(),
        seal: SealStats::default(),
        seal_peers: 0,
        spilling: node.spilling_to_other_sites(),
        fast_path: None,
        kernel_drops: crate::KernelDrops::default(),
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
    load: watch::Sender<LocalLoad>,
    stop: watch::Receiver<bool>,
    /// Set once the daemon began to stop (see [`Stop`]).
    stopping: bool,
    remaining: watch::Sender<Option<FlowsNeedingDaemon>>,
    /// Flow-recovery messages for the control plane to send.
    flow_out: mpsc::Sender<Vec<(String, FlowMessage)>>,
    /// Carrier packets to pass on to their server (the second hop), after the batch.
    second_hop: Vec<(IpAddr, u64, Vec<u8>)>,
    /// The sealed carrier's keys, and which peers get sealed packets.
    keys: CarrierKeys,
    sealing: Sealing,
    /// Room for one batch of sealed packets.
    sealed: Vec<u8>,
    /// The kernel fast path, when it runs, and when it was last reconciled.
    offload: Option<crate::Offload>,
    reconciled: Instant,
    /// The kernel's drops before the TUN and the carrier socket, sampled once a second.
    kernel_drops: KernelDropsReader,
    ticks: u64,
}

/// Which carrier packets are sealed (see [`ringlb_core::seal`]).
#[derive(Debug, Clone, Default)]
pub struct Sealing {
    /// Seal every packet and refuse plaintext ones (`carrier.require_authenticated`).
    pub require: bool,
    /// Seal packets to members of other sites and refuse plaintext from them
    /// (`carrier.seal_between_sites`).
    pub between_sites: bool,
    pub config: seal::SealConfig,
}

/// A change to apply to the core between packets, from the control plane.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeUpdate {
    /// A member, its load, or its removal.
    Cluster(ringlb_core::Update),
    /// Whether this node takes new flows (false: drained, or its app unhealthy).
    Drain(bool),
    /// This node's own capacity weight (a reload).
    Weight(f64),
    /// A sealed-carrier secret from a new QUIC session with the member `name`.
    CarrierKey { name: String, direction: Direction, secret: Secret },
    /// The control plane's latest round trip to the member `name`.
    Rtt { name: String, rtt: Duration },
}

/// How the rest of the process talks to a running [`Driver`].
#[derive(Debug)]
pub struct DriverHandle {
    pub snapshots: SnapshotRequests,
    pub updates: mpsc::Sender<NodeUpdate>,
    pub load: watch::Receiver<LocalLoad>,
    pub stop: Stop,
    /// Flow-recovery messages (member name, message) for the control plane to send; nothing
    /// comes without a control plane to tell the core about members.
    pub flow_messages: mpsc::Receiver<Vec<(String, FlowMessage)>>,
}

/// Starts the packet loop's stop and follows it. After [`Stop::begin`] the node drains (it
/// takes no new flows from other entries), serves the new flows that enter through it itself
/// (as fail-open delivery will once the daemon is gone), and the loop counts at every tick the
/// flows that still need the daemon. When to exit is the caller's decision: the loop runs until
/// the future given to [`Driver::run`] completes.
#[derive(Debug)]
pub struct Stop {
    begin: watch::Sender<bool>,
    remaining: watch::Receiver<Option<FlowsNeedingDaemon>>,
}

impl Stop {
    pub fn begin(&self) {
        self.begin.send_replace(true);
    }

    /// Waits for the next count (one per tick, 4 a second, once stopping); `None` when the
    /// packet loop has ended.
    pub async fn next_count(&mut self) -> Option<FlowsNeedingDaemon> {
        loop {
            self.remaining.changed().await.ok()?;
            if let Some(count) = *self.remaining.borrow_and_update() {
                return Some(count);
            }
        }
    }
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
    Stop,
}

impl Driver {
    pub fn new(node: Node, tun: AsyncDevice, carrier: Carrier, sealing: Sealing) -> (Self, DriverHandle) {
        let (tx, rx) = mpsc::channel(16);
        let (up_tx, up_rx) = mpsc::channel(1024);
        let (load_tx, load_rx) = watch::channel(LocalLoad::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let (remaining_tx, remaining_rx) = watch::channel(None);
        let (flow_tx, flow_rx) = mpsc::channel(64);
        let tun_name = tun.name().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot learn the TUN's name; its queue's drops stay unknown");
            String::new()
        });
        let kernel_drops = KernelDropsReader::new(tun_name, carrier.receive_socket());
        let driver = Driver {
            kernel_drops,
            ticks: 0,
            flow_out: flow_tx,
            second_hop: Vec::new(),
            keys: CarrierKeys::new(sealing.config),
            sealing,
            sealed: vec![0u8; 2 * 65_536 + MAX_SEGMENTS * seal::OVERHEAD],
            node,
            tun,
            carrier,
            origin: Instant::now(),
            requests: rx,
            updates: up_rx,
            load: load_tx,
            stop: stop_rx,
            stopping: false,
            remaining: remaining_tx,
            offload: None,
            reconciled: Instant::now(),
        };
        let stop = Stop { begin: stop_tx, remaining: remaining_rx };
        (
            driver,
            DriverHandle {
                snapshots: SnapshotRequests(tx),
                updates: up_tx,
                load: load_rx,
                stop,
                flow_messages: flow_rx,
            },
        )
    }

    /// Runs the kernel fast path beside the TUN path: settled flows are offloaded to it (see
    /// [`crate::offload`]), at most `max_flows` at once.
    pub fn with_fast_path(mut self, offload: crate::Offload, max_flows: usize) -> Self {
        if let Err(e) = self.carrier.disable_receive_offload() {
            tracing::warn!(error = %e, "fast path: cannot turn off UDP GRO on the carrier socket; a NIC's GRO may reorder offloaded flows");
        }
        self.node.enable_offload(max_flows);
        self.offload = Some(offload);
        self.refresh_offload_eligibility();
        self
    }

    /// The fast path carries plaintext only: members the carrier seals to are not eligible.
    /// The program sends by the underlay interface only: members routed elsewhere are not
    /// eligible either.
    fn refresh_offload_eligibility(&mut self) {
        let Some(offload) = &self.offload else { return };
        let peers: Vec<_> = self.node.members().iter().map(|(id, m)| (id, m.addr)).collect();
        let reachable: Vec<bool> = peers.iter().map(|&(_, addr)| offload.reaches(addr)).collect();
        for ((id, addr), reachable) in peers.into_iter().zip(reachable) {
            let eligible = reachable && !self.seals_to(addr);
            self.node.set_offload_eligible(id, eligible);
        }
    }

    /// Carries out the core's pending offload decisions, if any.
    fn apply_offload(&mut self) {
        let Some(offload) = &mut self.offload else { return };
        let origin = self.origin;
        offload.apply(&mut self.node, || Timestamp::from_duration(origin.elapsed()), &self.carrier);
    }

    /// Carries out the core's offload decisions; reconciles once a second (or at once with
    /// `now_too`, after a change of members).
    fn run_offload(&mut self, reconcile_now: bool) {
        let Some(offload) = &mut self.offload else { return };
        if reconcile_now || self.reconciled.elapsed() >= crate::offload::RECONCILE_EVERY {
            self.reconciled = Instant::now();
            let now = Timestamp::from_duration(self.origin.elapsed());
            offload.reconcile(&mut self.node, now, &self.carrier);
        } else {
            let origin = self.origin;
            offload.apply(&mut self.node, || Timestamp::from_duration(origin.elapsed()), &self.carrier);
        }
    }

    /// Connections the kernel kept while no daemon ran (fail-open), or that a previous daemon
    /// placed here, stay here: the consistent-hash fallback would send most of them to a peer.
    fn adopt_kernel_connections(&mut self) {
        let vip = self.node.config().vip;
        match crate::sockets::tcp_connections_on(vip) {
            Ok(keys) => {
                let now = self.now();
                let adopted = keys.into_iter().filter(|&k| self.node.adopt_local_flow(now, k)).count();
                if adopted > 0 {
                    tracing::info!(connections = adopted, "pinned the connections the kernel already serves here");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the kernel's connections on the VIP; none pinned"),
        }
    }

    /// Counts the flows that still need the daemon and tells the [`Stop`] handle.
    fn count_remaining(&mut self) {
        let now = self.now();
        self.remaining.send_replace(Some(self.node.flows_needing_daemon(now)));
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.origin.elapsed())
    }

    /// Runs until `shutdown` completes or the TUN fails for good. First pins to this node the
    /// connections its kernel already serves on the VIP (see [`crate::sockets`]).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        self.adopt_kernel_connections();
        // TUN reads: virtio-net header, then a packet or a GSO super-packet.
        let mut tun_buf = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET];
        // One carrier read may return up to 64 coalesced datagrams (UDP GRO).
        let mut carrier_buf = vec![0u8; MAX_SEGMENTS_PER_READ * 9216];
        let mut segments = Segments::new();
        let mut coalesce = Coalesce::new();
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
                Ok(()) = self.stop.changed(), if !self.stopping => Event::Stop,
                () = &mut shutdown => break,
            };
            match event {
                Event::Tun(Ok(n)) => {
                    // What each packet offered or withdrew goes into the kernel's table right after
                    // the packet went on: before the flow's next packet can come (a handshake's
                    // ACK comes back within a round trip), and not before this one is through (a
                    // handshake's last ACK that settles a flow served here must have made the
                    // connection in the kernel before the program delivers its first data: see
                    // the core's `offload` module).
                    self.on_tun_read(&mut tun_buf[..n], &mut segments).await;
                    self.apply_offload();
                    // More may be queued: take them before going back to the select.
                    for _ in 1..MAX_READS_PER_WAKEUP {
                        match self.tun.try_recv(&mut tun_buf) {
                            Ok(n) => {
                                self.on_tun_read(&mut tun_buf[..n], &mut segments).await;
                                self.apply_offload();
                            }
                            Err(_) => break,
                        }
                    }
                    self.run_offload(false);
                }
                Event::Tun(Err(e)) if is_transient(&e) => {}
                Event::Tun(Err(e)) => return Err(e),
                Event::Carrier(first) => {
                    // Drain what the carrier has queued (a bounded number of reads), then hand
                    // all accepted packets to the TUN in one coalescing write.
                    let mut accepted = 0;
                    let (mut result, mut reads) = (first, 1);
                    loop {
                        match result {
                            Ok(rx) => accepted = self.accept_carrier(&mut carrier_buf, &rx, &mut coalesce, accepted),
                            Err(RecvError::Malformed(reason)) => {
                                tracing::trace!(?reason, "malformed carrier packet");
                                self.node.count_drop(DropReason::BadCarrierHeader);
                            }
                            Err(RecvError::Io(e)) => {
                                if !is_transient(&e) {
                                    tracing::debug!(error = %e, "carrier receive error");
                                }
                                break;
                            }
                        }
                        // Stop before a read whose packets could not be handled: a datagram
                        // taken from the socket is never left unprocessed.
                        if reads == MAX_READS_PER_WAKEUP || accepted + MAX_SEGMENTS_PER_READ > coalesce.bufs.len() {
                            break;
                        }
                        result = self.carrier.try_recv(&mut carrier_buf);
                        reads += 1;
                    }
                    self.deliver_batch(&mut coalesce, accepted).await;
                    for (addr, hash, pkt) in std::mem::take(&mut self.second_hop) {
                        self.forward(addr, hash, &pkt, pkt.len()).await;
                    }
                    self.run_offload(false);
                }
                Event::Tick => {
                    let now = self.now();
                    // Usage first: a flow busy in the kernel must not expire as idle.
                    self.run_offload(false);
                    self.node.handle_timeout(now);
                    let mut msgs = Vec::new();
                    while let Some(m) = self.node.poll_flow_message() {
                        msgs.push(m);
                    }
                    // Claims are repeated and teaching is asked again, so a full queue loses
                    // nothing for good; the packet loop never waits on the control plane.
                    if !msgs.is_empty() && self.flow_out.try_send(msgs).is_err() {
                        tracing::debug!("control plane busy: flow-recovery messages dropped");
                    }
                    self.load.send_replace(LocalLoad {
                        served_flows: u32::try_from(self.node.served_flows()).unwrap_or(u32::MAX),
                        served_new_flows: self.node.counters().served_new_flows,
                    });
                    if self.stopping {
                        self.count_remaining();
                    }
                    // Often enough that the socket's 32-bit counter cannot wrap unseen.
                    self.ticks += 1;
                    if self.ticks.is_multiple_of(KERNEL_DROPS_EVERY) {
                        self.kernel_drops.sample(self.carrier.receive_socket());
                    }
                }
                Event::Stop => {
                    if *self.stop.borrow() {
                        self.stopping = true;
                        self.node.set_draining(true);
                        self.count_remaining();
                    }
                }
                Event::Update(NodeUpdate::Cluster(update)) => {
                    let now = self.now();
                    // Keys stay when a member is forgotten: its sessions may outlive that, and an
                    // address taken over by another member is bound anew.
                    if let ringlb_core::Update::Member { name, underlay, .. } = &update {
                        self.keys.bind(name, *underlay);
                    }
                    if let Err(e) = self.node.apply(now, &update) {
                        tracing::warn!(?update, error = %e, "member update refused by the data plane");
                    }
                    if matches!(update, ringlb_core::Update::Member { .. } | ringlb_core::Update::Removed { .. }) {
                        // A member's site, address or state may have changed: withdraw at once
                        // what the fast path must no longer carry.
                        self.refresh_offload_eligibility();
                        self.run_offload(true);
                    }
                }
                // A stopping node stays drained whatever the control plane says.
                Event::Update(NodeUpdate::Drain(on)) if !self.stopping => self.node.set_draining(on),
                Event::Update(NodeUpdate::Drain(_)) => {}
                Event::Update(NodeUpdate::Weight(w)) => self.node.set_local_weight(w),
                Event::Update(NodeUpdate::Rtt { name, rtt }) => self.node.set_rtt(&name, rtt),
                Event::Update(NodeUpdate::CarrierKey { name, direction, secret }) => {
                    let now = self.now();
                    self.keys.install(now, &name, direction, secret);
                }
                Event::Snapshot(reply) => {
                    let _ = reply.send(Snapshot {
                        stopping: *self.remaining.borrow(),
                        seal: self.keys.stats(),
                        seal_peers: self.keys.peers_with_keys(),
                        fast_path: self.offload.as_ref().map(|o| o.snapshot(&self.node)),
                        kernel_drops: self.kernel_drops.sample(self.carrier.receive_socket()),
                        ..snapshot(&self.node)
                    });
                }
            }
        }
        Ok(())
    }

    /// One TUN read: a virtio-net header and a packet or GSO super-packet. The core decides on
    /// the (super-)packet as a whole: all its segments share one 5-tuple.
    async fn on_tun_read(&mut self, frame: &mut [u8], segments: &mut Segments) {
        let Ok(mut hdr) = VirtioNetHdr::decode(frame) else {
            self.node.count_drop(DropReason::Truncated);
            return;
        };
        if frame.len() <= VIRTIO_NET_HDR_LEN {
            self.node.count_drop(DropReason::Truncated);
            return;
        }
        // A single packet whose checksum the kernel left for the device to finish: finish it,
        // so that the core sees (and may edit) a packet with a complete checksum.
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE && hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            let pkt = &mut frame[VIRTIO_NET_HDR_LEN..];
            if usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2 > pkt.len() {
                self.node.count_drop(DropReason::Truncated);
                return;
            }
            finish_checksum(pkt, usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
            hdr.flags &= !VIRTIO_NET_HDR_F_NEEDS_CSUM;
            if hdr.encode(&mut frame[..VIRTIO_NET_HDR_LEN]).is_err() {
                return;
            }
        }
        let now = self.now();
        let pkt = &mut frame[VIRTIO_NET_HDR_LEN..];
        let verdict =
            if self.stopping { self.node.on_tun_packet_stopping(now, pkt) } else { self.node.on_tun_packet(now, pkt) };
        tracing::trace!(len = frame.len(), gso = hdr.gso_type, ?verdict, "tun packet");
        match verdict {
            // Back into the kernel as it came, super-packet and all.
            Verdict::Deliver => self.write_tun(frame).await,
            Verdict::Forward { addr, flow_hash, .. } => {
                if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
                    let pkt = &frame[VIRTIO_NET_HDR_LEN..];
                    self.forward(addr, flow_hash, pkt, pkt.len()).await;
                    return;
                }
                // Split into MTU-sized packets with complete checksums, laid back to back so
                // the carrier can send them in one go (UDP GSO): all but the last are equal.
                let (n, stride, total) = match split_joined(&mut frame[VIRTIO_NET_HDR_LEN..], hdr, segments) {
                    Ok(split) => split,
                    Err(e) => {
                        // More segments than the buffers hold, or a header it cannot split.
                        tracing::trace!(error = %e, "gso split failed");
                        self.node.count_drop(DropReason::TooBig);
                        return;
                    }
                };
                // One UDP GSO send carries at most 64 KiB of payload, sealed segments included.
                let sent_stride = stride + if self.seals_to(addr) { seal::OVERHEAD } else { 0 };
                let batch = batch_for(self.carrier.max_batch(), sent_stride);
                let joined = std::mem::take(&mut segments.joined);
                for first in (0..n).step_by(batch) {
                    let end = ((first + batch) * stride).min(total);
                    self.forward(addr, flow_hash, &joined[first * stride..end], stride).await;
                }
                segments.joined = joined;
            }
            Verdict::Drop(_) => {}
        }
    }

    /// Whether `addr` is a member in another site than this node's.
    fn in_another_site(&self, addr: IpAddr) -> bool {
        let members = self.node.members();
        let own = members.get(self.node.config().local).map(|m| &m.site);
        let theirs = members.by_addr(addr).and_then(|id| members.get(id)).map(|m| &m.site);
        matches!((own, theirs), (Some(a), Some(b)) if a != b)
    }

    /// Whether packets to `addr` are sealed: always between sites, everywhere on demand.
    fn seals_to(&self, addr: IpAddr) -> bool {
        self.sealing.require || (self.sealing.between_sites && self.in_another_site(addr))
    }

    /// Whether plaintext carrier packets from `from` are taken (the core still checks that it
    /// is a member).
    fn takes_plaintext_from(&self, from: IpAddr) -> bool {
        // Exactly what this node would seal towards it must come sealed from it.
        !self.seals_to(from)
    }

    /// Sends `pkts`, inner packets of `segment` bytes back to back (the last may be shorter),
    /// sealed when `addr` needs it; a failure loses (and counts) every packet of the batch.
    async fn forward(&mut self, addr: IpAddr, flow_hash: u64, pkts: &[u8], segment: usize) {
        let count = u64::try_from(pkts.len().div_ceil(segment.max(1))).unwrap_or(1);
        let result = if self.seals_to(addr) {
            let now = self.now();
            match self.keys.seal(now, addr, pkts, segment, &mut self.sealed) {
                Ok(n) => self.carrier.send(addr, flow_hash, &self.sealed[..n], segment + seal::OVERHEAD).await,
                Err(e) => {
                    tracing::trace!(error = ?e, %addr, "cannot seal");
                    let reason = match e {
                        SealError::NoKey => DropReason::CarrierNoKey,
                        SealError::TooBig => DropReason::TooBig,
                    };
                    self.node.count_drops(reason, count);
                    return;
                }
            }
        } else {
            self.carrier.send(addr, flow_hash, pkts, segment).await
        };
        if let Err(e) = result {
            let reason = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                DropReason::TooBig
            } else {
                DropReason::CarrierSendError
            };
            tracing::trace!(error = %e, %addr, "carrier send failed");
            self.node.count_drops(reason, count);
        }
    }

    /// Checks the inner packets of one carrier read (several with UDP GRO, `stride` bytes apart)
    /// and copies those to deliver into `c` from position `accepted` on; returns the new count.
    fn accept_carrier(&mut self, buf: &mut [u8], rx: &Received, c: &mut Coalesce, mut accepted: usize) -> usize {
        let (mut at, end) = (rx.inner.start, rx.inner.end);
        let now = self.now(); // one clock read per carrier read, not per inner packet
                              // One sender per read: whether it may send plaintext is looked up once, not per packet.
        let plaintext_ok = self.takes_plaintext_from(rx.from);
        while at < end {
            let mut inner = at..(at + rx.stride).min(end);
            at = inner.end;
            let sealed = seal::is_sealed(&buf[inner.clone()]);
            if sealed {
                match self.keys.open(now, rx.from, &mut buf[inner.clone()]) {
                    Ok(len) => inner = inner.start + seal::HEADER..inner.start + seal::HEADER + len,
                    Err(e) => {
                        tracing::trace!(from = %rx.from, error = ?e, "sealed carrier packet refused");
                        self.node.count_drop(match e {
                            OpenError::Malformed => DropReason::BadCarrierHeader,
                            OpenError::NoKey => DropReason::CarrierNoKey,
                            OpenError::StaleKey => DropReason::CarrierStaleKey,
                            OpenError::Replayed => DropReason::CarrierReplayed,
                            OpenError::Forged => DropReason::CarrierForged,
                        });
                        continue;
                    }
                }
            } else if !plaintext_ok {
                self.node.count_drop(DropReason::CarrierPlaintextRefused);
                continue;
            }
            let verdict = self.node.on_carrier_packet(now, rx.from, &buf[inner.clone()]);
            tracing::trace!(from = %rx.from, len = inner.len(), ?verdict, "carrier packet");
            match verdict {
                Verdict::Deliver => {}
                Verdict::Forward { addr, flow_hash, .. } => {
                    // Rare (a connection an entry lost): a copy, sent after the batch.
                    if self.second_hop.len() < MAX_SEGMENTS_PER_READ * MAX_READS_PER_WAKEUP {
                        self.second_hop.push((addr, flow_hash, buf[inner].to_vec()));
                    } else {
                        self.node.count_drop(DropReason::CarrierSendError);
                    }
                    continue;
                }
                Verdict::Drop(_) => continue,
            }
            // A peer's kernel fast path may send a packet whose checksum its sender left to
            // offload (see `ringlb_wire::finish_partial_checksum`); sealed packets come from a
            // daemon, which always finishes them.
            if !sealed {
                ringlb_wire::finish_partial_checksum(&mut buf[inner.clone()]);
            }
            let Some(b) = c.bufs.get_mut(accepted) else {
                self.node.count_drop(DropReason::TunWriteError);
                continue;
            };
            b.clear();
            b.resize(GRO_HEADROOM, 0);
            b.extend_from_slice(&buf[inner]);
            accepted += 1;
        }
        accepted
    }

    /// Writes the first `n` packets of `c` into the TUN, coalescing those of one TCP or UDP
    /// flow into super-packets (GRO) so that the kernel takes them in a few writes.
    async fn deliver_batch(&mut self, c: &mut Coalesce, n: usize) {
        if n == 0 {
            return;
        }
        if let Err(e) = self.tun.send_multiple(&mut c.table, &mut c.bufs[..n], GRO_HEADROOM).await {
            tracing::trace!(error = %e, "tun batch write failed");
            self.node.count_drop(DropReason::TunWriteError);
        }
    }

    /// Hands a frame (virtio-net header and packet) to the local kernel through the TUN.
    async fn write_tun(&mut self, frame: &[u8]) {
        if let Err(e) = self.tun.send(frame).await {
            tracing::trace!(error = %e, "tun write failed");
            self.node.count_drop(DropReason::TunWriteError);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_fits_one_udp_send_sealed_or_not() {
        // The TUN MTU with [control] on a 1500-byte underlay: 1500 − 28 − 32.
        for stride in [1440, 1440 + seal::OVERHEAD, 576, 9000, 9000 + seal::OVERHEAD] {
            let batch = batch_for(64, stride);
            assert!(batch * stride <= 65_507 - 8, "{batch} × {stride} exceeds one UDP datagram");
            assert!(batch >= 1);
        }
        // Sealing 45 plaintext segments of 1440 (the old sizing) would not fit.
        const { assert!(45 * (1440 + seal::OVERHEAD) > 65_507) };
        assert_eq!(batch_for(64, 1440 + seal::OVERHEAD), 44);
    }
}
