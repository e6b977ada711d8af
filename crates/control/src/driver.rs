//! The control-plane driver: one QUIC endpoint per node, carrying the cluster state machine's
//! datagrams ([`ringlb_core::Cluster`]) and nothing of its rules.
//!
//! Each node sends on connections it opens (one per peer, to the peer's node name, verified)
//! and receives on connections peers open to it (authenticated by their client certificate).
//! What the certificate says (the node name, its IP addresses) and the connection's source
//! address go to the core with every datagram; the core decides what to believe.
//!
//! The driver's own bounds: at most `max_handshakes` handshakes at once (beyond
//! `retry_above`, a client must first prove its address with a QUIC Retry), one inbound
//! connection per node name (the newest), a token bucket per node name (shared by its
//! connections), and a bounded queue to the core that a flooding peer cannot fill for the
//! others. Every refusal is counted
//! with the core's [`Refusal`] reasons. Connection loss and failed sends are a hint to the core
//! (probe that peer next), never a verdict.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringlb_core::cluster::message::LoadVector;
use ringlb_core::cluster::{ClusterConfig, Identity, MemberView, Outcome, Peer, RateLimit, Refusal, Stats, Update};
use ringlb_core::seal::{Direction, Secret};
use ringlb_core::{Cluster, LocalLoad, MemberState, Timestamp};
use tokio::sync::{mpsc, watch};

use crate::tls::{self, TlsFiles};

/// Bounds the driver enforces before the core sees anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most handshakes in progress at once; more are refused.
    pub max_handshakes: usize,
    /// Handshakes in progress beyond which a client must first answer a QUIC Retry.
    pub retry_above: usize,
    /// Datagrams a second one peer connection may send, and the burst it may save up.
    pub peer_rate: f64,
    pub peer_burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_handshakes: 64, retry_above: 16, peer_rate: 200.0, peer_burst: 400.0 }
    }
}

/// Everything the control plane needs to start.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub identity: Identity,
    /// Address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// `(name, address)` of nodes to join through.
    pub seeds: Vec<(String, SocketAddr)>,
    pub tls: TlsFiles,
    pub cluster: ClusterConfig,
    pub limits: Limits,
    /// How often this node sends its load vector to every peer.
    pub load_interval: Duration,
    /// Must grow across restarts: wall-clock milliseconds at start.
    pub incarnation: u64,
}

/// What the control plane tells the data plane.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlEvent {
    /// A change the cluster state machine made.
    Cluster(Update),
    /// Whether this node takes new flows changed: drained by the operator, or its app failing
    /// its health checks (true: it takes none).
    Drain(bool),
    /// A new QUIC session with the peer `name` (its certificate's name): the sealed carrier's
    /// secret for one direction, exported from that session (see [`carrier_secret`]).
    CarrierKey { name: String, direction: Direction, secret: Secret },
    /// The latest round-trip time to a peer (about twice a second each), for placement across
    /// sites.
    Rtt { name: String, rtt: Duration },
}

/// The TLS exporter label of the sealed carrier's secrets (RFC 8446 §7.5).
const CARRIER_EXPORTER_LABEL: &[u8] = b"EXPORTER-ringlb-sealed-carrier";

/// The sealed carrier's secret for the direction this connection serves: packets from the
/// node that opened it to the node that accepted it. Both ends compute the same 32 bytes;
/// nobody else can.
pub fn carrier_secret(conn: &quinn::Connection) -> Option<Secret> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, CARRIER_EXPORTER_LABEL, b"v1").ok()?;
    Some(Secret(out))
}

/// One member as `ringlb status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub state: MemberState,
    pub incarnation: u64,
    pub underlay: std::net::IpAddr,
    pub weight: f32,
    pub rtt: Option<Duration>,
    pub load: Option<LoadVector>,
    pub load_age: Option<Duration>,
    /// Whether it computes the same flow hash as this node.
    pub flow_hash_agrees: bool,
}

#[derive(Debug, Default)]
struct Status {
    me: Option<PeerStatus>,
    peers: Vec<PeerStatus>,
    stats: Stats,
    local_health: u32,
    draining: bool,
    /// The data plane stopped publishing its load: this node stopped advertising itself.
    dataplane_stalled: bool,
}

/// Read the status, drain or undrain; cheap to clone.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    status: Arc<Mutex<Status>>,
    commands: mpsc::Sender<Command>,
}

#[derive(Debug)]
enum Command {
    Drain(bool),
    EntryClaim { candidate: bool, claim: bool },
    AppHealthy(bool),
    Reload(Box<Reload>, tokio::sync::oneshot::Sender<Result<(), String>>),
    Flows(Vec<(String, ringlb_core::FlowMessage)>),
}

/// What a configuration reload changes in the control plane.
#[derive(Debug, Clone, Default)]
pub struct Reload {
    /// This node's new capacity weight.
    pub weight: Option<f32>,
    /// Certificate files to load again (renewed certificate, new CA bundle): new connections
    /// use them; established ones, and membership, stay.
    pub tls: Option<TlsFiles>,
    /// New seeds.
    pub seeds: Option<Vec<(String, SocketAddr)>>,
    /// New failure-detection timers and bounds.
    pub cluster: Option<ringlb_core::ClusterConfig>,
}

impl ControlHandle {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node first, then its peers by name.
    pub fn members(&self) -> Vec<PeerStatus> {
        let s = self.status();
        s.me.iter().cloned().chain(s.peers.iter().cloned()).collect()
    }

    /// Refusals by reason, transitions seen, refutations made.
    pub fn stats(&self) -> Stats {
        self.status().stats.clone()
    }

    /// 0 when healthy; this node's timeouts are scaled by one more than this.
    pub fn local_health(&self) -> u32 {
        self.status().local_health
    }

    pub fn draining(&self) -> bool {
        self.status().draining
    }

    pub fn dataplane_stalled(&self) -> bool {
        self.status().dataplane_stalled
    }

    pub async fn drain(&self, on: bool) -> bool {
        self.commands.send(Command::Drain(on)).await.is_ok()
    }

    /// Says whether this node may be elected to own the VIP at layer 2 (`candidate`) and
    /// whether it owns it (`claim`); peers hear it at once, in a load vector sent for the
    /// purpose, and in every one after.
    pub async fn set_entry_claim(&self, candidate: bool, claim: bool) -> bool {
        self.commands.send(Command::EntryClaim { candidate, claim }).await.is_ok()
    }

    /// Applies a reload; the error says what was refused (nothing is applied then).
    pub async fn reload(&self, reload: Reload) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::Reload(Box::new(reload), tx))
            .await
            .map_err(|_| "the control plane has stopped".to_owned())?;
        rx.await.map_err(|_| "the control plane has stopped".to_owned())?
    }

    /// Whether this node's app passes its health checks: while it does not, the node takes no
    /// new flows (peers hear it at once, in a load vector sent for the purpose), and keeps the
    /// ones it has.
    /// Sends the data plane's flow-recovery messages (see `ringlb_core::Node`) to their members.
    pub async fn send_flows(&self, msgs: Vec<(String, ringlb_core::FlowMessage)>) -> bool {
        self.commands.send(Command::Flows(msgs)).await.is_ok()
    }

    pub async fn set_app_healthy(&self, healthy: bool) -> bool {
        self.commands.send(Command::AppHealthy(healthy)).await.is_ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("binding the control endpoint on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

enum Inbound {
    Datagram { peer: Arc<Peer>, bytes: Bytes, conn: quinn::Connection },
    CarrierKey { name: String, direction: Direction, secret: Secret },
    Refused(Refusal, u64),
    Unreachable(String),
    Rtt(String, Duration),
}

/// Starts the control plane; it runs until `shutdown` fires, then announces its departure.
pub fn spawn(
    config: ControlConfig,
    to_dataplane: mpsc::Sender<ControlEvent>,
    local_load: watch::Receiver<LocalLoad>,
    shutdown: watch::Receiver<bool>,
) -> Result<(ControlHandle, tokio::task::JoinHandle<()>), ControlError> {
    let server = tls::server_config(&config.tls)?;
    let client = tls::client_config(&config.tls)?;
    let endpoint = quinn::Endpoint::server(server, config.listen)
        .map_err(|source| ControlError::Bind { addr: config.listen, source })?;
    let client = Arc::new(Mutex::new(client));
    let status = Arc::new(Mutex::new(Status::default()));
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let handle = ControlHandle { status: status.clone(), commands: cmd_tx };
    let (in_tx, in_rx) = mpsc::channel(4096);
    let origin = Instant::now();
    tokio::spawn(accept_loop(endpoint.clone(), in_tx.clone(), config.limits.clone(), origin));
    let task = tokio::spawn(async move {
        let mut c = Control::new(config, endpoint, client, status, in_tx, to_dataplane, origin);
        c.run(in_rx, cmd_rx, local_load, shutdown).await;
    });
    Ok((handle, task))
}

fn timestamp(origin: Instant) -> Timestamp {
    Timestamp::from_duration(origin.elapsed())
}

/// Accepts connections within the handshake bounds, and hands each authenticated datagram,
/// with what the certificate and the connection say of its sender, to the control loop.
async fn accept_loop(endpoint: quinn::Endpoint, tx: mpsc::Sender<Inbound>, limits: Limits, origin: Instant) {
    let handshaking = Arc::new(AtomicUsize::new(0));
    // Per certificate name, across its connections: its token bucket, and its one inbound
    // connection (the newest; an older one is closed as soon as a newer one is up).
    let by_name: Arc<Mutex<HashMap<String, (RateLimit, quinn::Connection)>>> = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let busy = handshaking.load(Ordering::Relaxed);
        if busy >= limits.max_handshakes {
            incoming.refuse();
            let _ = tx.try_send(Inbound::Refused(Refusal::HandshakeLimit, 1));
            continue;
        }
        if busy >= limits.retry_above && !incoming.remote_address_validated() && incoming.may_retry() {
            // Stateless: costs nothing until the client proves it owns its address.
            let _ = incoming.retry();
            continue;
        }
        handshaking.fetch_add(1, Ordering::Relaxed);
        let (tx, handshaking, limits, by_name) = (tx.clone(), handshaking.clone(), limits.clone(), by_name.clone());
        tokio::spawn(async move {
            let connecting = incoming.await;
            handshaking.fetch_sub(1, Ordering::Relaxed);
            let conn = match connecting {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "control handshake refused");
                    let _ = tx.try_send(Inbound::Refused(Refusal::Tls, 1));
                    return;
                }
            };
            let Some(name) = tls::peer_name(&conn) else {
                conn.close(1u32.into(), b"no node name in certificate");
                let _ = tx.try_send(Inbound::Refused(Refusal::Identity, 1));
                return;
            };
            let peer = Arc::new(Peer { name, cert_addrs: tls::peer_addrs(&conn), source: conn.remote_address() });
            tracing::debug!(peer = %peer.name, addr = %peer.source, "control connection accepted");
            if let Some(secret) = carrier_secret(&conn) {
                let key = Inbound::CarrierKey { name: peer.name.clone(), direction: Direction::Receive, secret };
                let _ = tx.send(key).await;
            }
            {
                let mut names = by_name.lock().unwrap_or_else(|e| e.into_inner());
                // Bounded: only certificate holders get here, and a name's entry is replaced.
                if names.len() >= 4 * 65_536 {
                    names.retain(|_, (_, c)| c.close_reason().is_none());
                }
                let limit = RateLimit::new(limits.peer_rate, limits.peer_burst, timestamp(origin));
                let entry = names.entry(peer.name.clone()).or_insert_with(|| (limit, conn.clone()));
                if entry.1.stable_id() != conn.stable_id() {
                    let older = std::mem::replace(&mut entry.1, conn.clone());
                    older.close(4u32.into(), b"replaced by a newer connection");
                }
            }
            let mut refused = 0u64;
            while let Ok(bytes) = conn.read_datagram().await {
                let allowed = by_name
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&peer.name)
                    .is_some_and(|(limit, _)| limit.allow(timestamp(origin)));
                let admitted =
                    allowed && tx.try_send(Inbound::Datagram { peer: peer.clone(), bytes, conn: conn.clone() }).is_ok();
                if !admitted {
                    refused += 1;
                }
                // Counted in batches: a flood must not also flood the queue with its counts.
                if refused >= 64 && tx.try_send(Inbound::Refused(Refusal::RateLimited, refused)).is_ok() {
                    refused = 0;
                }
            }
            if refused > 0 {
                let _ = tx.send(Inbound::Refused(Refusal::RateLimited, refused)).await;
            }
        });
    }
}

/// Owns the outgoing connection to one peer: connects by name, sends what it is given, and
/// reports the peer unreachable when connecting or sending fails or the connection drops.
async fn peer_sender(
    endpoint: quinn::Endpoint,
    client: Arc<Mutex<quinn::ClientConfig>>,
    name: String,
    mut rx: mpsc::Receiver<(SocketAddr, Bytes)>,
    tx: mpsc::Sender<Inbound>,
) {
    let mut conn: Option<(SocketAddr, quinn::Connection)> = None;
    let mut last_rtt = Instant::now();
    while let Some((addr, bytes)) = rx.recv().await {
        if conn.as_ref().is_some_and(|(a, c)| *a != addr || c.close_reason().is_some()) {
            conn = None;
        }
        if conn.is_none() {
            // The client configuration of now: a reload may have brought a new certificate.
            let config = client.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let connecting = match endpoint.connect_with(config, addr, &name) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(peer = %name, error = %e, "cannot connect");
                    let _ = tx.send(Inbound::Unreachable(name.clone())).await;
                    continue;
                }
            };
            match tokio::time::timeout(Duration::from_secs(1), connecting).await {
                Ok(Ok(c)) => {
                    // A sender replaced while it connected (the peer restarted) must not hand
                    // over its key after its successor's: the newest key would lose.
                    if rx.is_closed() {
                        c.close(6u32.into(), b"replaced");
                        return;
                    }
                    if let Some(secret) = carrier_secret(&c) {
                        let key = Inbound::CarrierKey { name: name.clone(), direction: Direction::Send, secret };
                        let _ = tx.send(key).await;
                    }
                    conn = Some((addr, c));
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %name, error = %e, "connect failed");
                    let _ = tx.send(Inbound::Unreachable(name.clone())).await;
                    // Drop what queued up meanwhile rather than retry each message.
                    while rx.try_recv().is_ok() {}
                    continue;
                }
                Err(_) => {
                    let _ = tx.send(Inbound::Unreachable(name.clone())).await;
                    while rx.try_recv().is_ok() {}
                    continue;
                }
            }
        }
        if let Some((_, c)) = &conn {
            if c.send_datagram(bytes).is_err() {
                let _ = tx.send(Inbound::Unreachable(name.clone())).await;
                conn = None;
            } else if last_rtt.elapsed() > Duration::from_millis(500) {
                last_rtt = Instant::now();
                let _ = tx.send(Inbound::Rtt(name.clone(), c.rtt())).await;
            }
        }
    }
}

struct Control {
    config: ControlConfig,
    endpoint: quinn::Endpoint,
    /// What new outgoing connections present and check; replaced by a reload.
    client: Arc<Mutex<quinn::ClientConfig>>,
    cluster: Cluster,
    origin: Instant,
    status: Arc<Mutex<Status>>,
    inbound: mpsc::Sender<Inbound>,
    to_dataplane: mpsc::Sender<ControlEvent>,
    senders: HashMap<String, mpsc::Sender<(SocketAddr, Bytes)>>,
    /// The one inbound connection kept per node name (the newest).
    connections: HashMap<String, quinn::Connection>,
    rtts: HashMap<String, Duration>,
    /// Last incarnation seen per member, to notice restarts.
    incarnations: HashMap<String, u64>,
    draining: bool,
    cpu: CpuMeter,
    last_new_flows: Option<(u64, Instant)>,
    /// When the data plane last published its load; a silent data plane must not be advertised.
    dataplane_seen: Instant,
    /// When each loud refusal was last logged.
    warned: HashMap<Refusal, Instant>,
    /// When each peer's sender was last replaced for a new incarnation.
    reconnected: HashMap<String, Instant>,
    /// Sealed-carrier secrets of new sessions and round-trip times, for the data plane (sent,
    /// never dropped, by [`Control::flush`]).
    pending_events: Vec<ControlEvent>,
}

/// A data plane silent for this long is taken as hung: its node stops sending load vectors, so
/// that peers stop placing new flows on it.
const DATAPLANE_STALL: Duration = Duration::from_secs(1);

impl Control {
    fn new(
        config: ControlConfig,
        endpoint: quinn::Endpoint,
        client: Arc<Mutex<quinn::ClientConfig>>,
        status: Arc<Mutex<Status>>,
        inbound: mpsc::Sender<Inbound>,
        to_dataplane: mpsc::Sender<ControlEvent>,
        origin: Instant,
    ) -> Self {
        let cluster = Cluster::new(
            config.identity.clone(),
            config.incarnation,
            config.seeds.clone(),
            config.cluster.clone(),
            config.incarnation,
            timestamp(origin),
        );
        Control {
            config,
            endpoint,
            client,
            cluster,
            origin,
            status,
            inbound,
            to_dataplane,
            senders: HashMap::new(),
            connections: HashMap::new(),
            rtts: HashMap::new(),
            incarnations: HashMap::new(),
            draining: false,
            cpu: CpuMeter::default(),
            last_new_flows: None,
            dataplane_seen: Instant::now(),
            pending_events: Vec::new(),
            warned: HashMap::new(),
            reconnected: HashMap::new(),
        }
    }

    fn now(&self) -> Timestamp {
        timestamp(self.origin)
    }

    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut commands: mpsc::Receiver<Command>,
        mut local_load: watch::Receiver<LocalLoad>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut load_tick = tokio::time::interval(self.config.load_interval);
        load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(name = %self.cluster.name(), incarnation = self.cluster.local().incarnation, "control plane running");
        loop {
            let deadline = self
                .cluster
                .poll_timeout()
                .map(|t| tokio::time::Instant::from_std(self.origin + Duration::from_nanos(t.as_nanos())));
            let sleep = tokio::time::sleep_until(
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1)),
            );
            tokio::select! {
                Some(msg) = inbound.recv() => self.on_inbound(msg),
                Some(cmd) = commands.recv() => match cmd {
                    Command::Drain(on) => {
                        self.draining = on;
                        self.cluster.set_draining(on);
                        let unhealthy = self.cluster.app_unhealthy();
                        let _ = self.to_dataplane.send(ControlEvent::Drain(on || unhealthy)).await;
                        tracing::info!(draining = on, "drain state changed");
                        self.publish_status();
                    }
                    Command::Reload(reload, done) => {
                        let _ = done.send(self.reload(*reload));
                    }
                    Command::Flows(msgs) => {
                        for (to, msg) in msgs {
                            self.cluster.send_flow(&to, msg);
                        }
                    }
                    Command::AppHealthy(healthy) => {
                        if self.cluster.app_unhealthy() == healthy {
                            self.cluster.set_app_unhealthy(!healthy);
                            self.send_load(&mut local_load);
                            let _ = self.to_dataplane.send(ControlEvent::Drain(self.draining || !healthy)).await;
                        }
                    }
                    Command::EntryClaim { candidate, claim } => {
                        if self.cluster.entry_claim() != claim || self.cluster.entry_candidate() != candidate {
                            self.cluster.set_entry_claim(claim);
                            self.cluster.set_entry_candidate(candidate);
                            self.send_load(&mut local_load);
                        }
                    }
                },
                _ = load_tick.tick() => {
                    self.send_load(&mut local_load);
                    self.publish_status();
                    // Senders to names the cluster no longer knows (hints given up) end.
                    let cluster = &self.cluster;
                    self.senders.retain(|name, _| cluster.knows(name));
                    self.reconnected.retain(|name, _| cluster.knows(name));
                }
                () = sleep => {
                    // What arrived while this thread did not run (a refutation, say) is heard
                    // before any timer judges silence.
                    for _ in 0..4096 {
                        match inbound.try_recv() {
                            Ok(msg) => self.on_inbound(msg),
                            Err(_) => break,
                        }
                    }
                    let now = self.now();
                    self.cluster.handle_timeout(now);
                }
                _ = shutdown.changed() => {
                    self.cluster.leave();
                    self.flush().await;
                    // Give the departure datagrams a moment to leave.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.endpoint.close(0u32.into(), b"leaving");
                    return;
                }
            }
            self.flush().await;
        }
    }

    fn on_inbound(&mut self, msg: Inbound) {
        let now = self.now();
        match msg {
            Inbound::Refused(why, n) => {
                for _ in 0..n {
                    self.cluster.count(why);
                }
            }
            Inbound::Unreachable(name) => self.cluster.handle_unreachable(&name),
            Inbound::Rtt(name, rtt) => {
                self.rtts.insert(name.clone(), rtt);
                // QUIC's estimate seeds the membership's own (a far member's first probes
                // then already wait long enough).
                self.cluster.observe_rtt(&name, rtt);
                // Sent with the next flush, like the keys; a newer one replaces an older.
                self.pending_events.retain(|e| !matches!(e, ControlEvent::Rtt { name: n, .. } if *n == name));
                self.pending_events.push(ControlEvent::Rtt { name, rtt });
            }
            Inbound::CarrierKey { name, direction, secret } => {
                // The name is the certificate's; the data plane binds it to the member's
                // underlay address, which the same certificate vouches for.
                self.pending_events.push(ControlEvent::CarrierKey { name, direction, secret });
            }
            Inbound::Datagram { peer, bytes, conn } => {
                // (One inbound connection per name is kept by the accept task.)
                self.connections.insert(peer.name.clone(), conn.clone());
                match self.cluster.handle_datagram(now, &peer, &bytes) {
                    Outcome::Accepted => {}
                    Outcome::Refused(why) => {
                        // What an operator must act on is said, once in a while per reason (a
                        // peer could otherwise fill the log); the counters have every one.
                        let loud = matches!(why, Refusal::TableFull | Refusal::Address | Refusal::AddressInUse);
                        let due = self.warned.get(&why).is_none_or(|t| t.elapsed() > Duration::from_secs(10));
                        if loud && due {
                            self.warned.insert(why, Instant::now());
                            tracing::warn!(peer = %peer.name, addr = %peer.source, reason = why.name(),
                                "control message refused (table_full: raise control.max_members; address: the claimed address is not in the peer's certificate or not its source; address_in_use: a live member holds it)");
                        } else {
                            tracing::debug!(peer = %peer.name, reason = why.name(), "control message refused");
                        }
                    }
                    Outcome::Close(why) => {
                        tracing::warn!(peer = %peer.name, addr = %peer.source, reason = why.name(), len = bytes.len(), "control message refused; closing the connection");
                        conn.close(2u32.into(), why.name().as_bytes());
                        self.connections.remove(&peer.name);
                    }
                }
            }
        }
    }

    fn reload(&mut self, reload: Reload) -> Result<(), String> {
        let tls = match &reload.tls {
            Some(files) => {
                let name = tls::own_name(files).map_err(|e| format!("control.cert: {e}"))?;
                let me = self.cluster.name().to_owned();
                if name.as_deref() != Some(me.as_str()) {
                    return Err(format!(
                        "control.cert = {:?}: names {:?}, but this node is {me:?}",
                        files.cert.display().to_string(),
                        name.unwrap_or_default()
                    ));
                }
                // What peers would refuse is refused here, before the working certificate goes.
                let info = crate::certs::read_info(&files.cert).map_err(|e| format!("control.cert: {e}"))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                if now < info.not_before || now > info.not_after {
                    return Err(format!(
                        "control.cert = {:?}: not valid now (valid from unix {} to {})",
                        files.cert.display().to_string(),
                        info.not_before,
                        info.not_after
                    ));
                }
                let id = &self.config.identity;
                for (what, ip) in [("node.address", id.underlay), ("control.listen", id.control.ip())] {
                    if !info.addrs.contains(&ip) {
                        return Err(format!(
                            "control.cert = {:?}: does not name {what} {ip}",
                            files.cert.display().to_string()
                        ));
                    }
                }
                let server = tls::server_config(files).map_err(|e| format!("control.cert: {e}"))?;
                let client = tls::client_config(files).map_err(|e| format!("control.cert: {e}"))?;
                Some((server, client))
            }
            None => None,
        };
        if let Some((server, client)) = tls {
            self.endpoint.set_server_config(Some(server));
            *self.client.lock().unwrap_or_else(|e| e.into_inner()) = client;
            tracing::info!("certificates reloaded: new connections use them");
        }
        if let Some(w) = reload.weight {
            self.cluster.set_weight(w);
            tracing::info!(weight = w, "weight changed");
        }
        if let Some(seeds) = reload.seeds {
            self.cluster.set_seeds(seeds);
        }
        if let Some(c) = reload.cluster {
            self.cluster.set_config(c);
        }
        Ok(())
    }

    fn send_load(&mut self, local_load: &mut watch::Receiver<LocalLoad>) {
        // The data plane publishes its load every tick; if it stopped, it may be hung while
        // this thread still runs: stop advertising this node rather than attract flows.
        if local_load.has_changed().unwrap_or(false) {
            self.dataplane_seen = Instant::now();
        }
        let stalled = self.dataplane_seen.elapsed() > DATAPLANE_STALL;
        let was_stalled =
            std::mem::replace(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()).dataplane_stalled, stalled);
        if stalled != was_stalled {
            if stalled {
                tracing::warn!("the data plane stopped publishing its load; not advertising this node");
            } else {
                tracing::info!("the data plane is back");
            }
        }
        if stalled {
            return;
        }
        let load = *local_load.borrow_and_update();
        let now = Instant::now();
        let rate = match self.last_new_flows.replace((load.served_new_flows, now)) {
            Some((before, at)) => {
                (load.served_new_flows.saturating_sub(before)) as f32 / now.duration_since(at).as_secs_f32().max(1e-3)
            }
            None => 0.0,
        };
        self.cluster.broadcast_load(load.served_flows, rate, self.cpu.sample());
    }

    fn send_bytes(&mut self, name: &str, addr: SocketAddr, bytes: Bytes) {
        let tx = self.senders.entry(name.to_owned()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(256);
            tokio::spawn(peer_sender(
                self.endpoint.clone(),
                self.client.clone(),
                name.to_owned(),
                rx,
                self.inbound.clone(),
            ));
            tx
        });
        // A full queue means the peer is not keeping up; the probe will notice.
        let _ = tx.try_send((addr, bytes));
    }

    async fn flush(&mut self) {
        for key in std::mem::take(&mut self.pending_events) {
            let _ = self.to_dataplane.send(key).await;
        }
        let mut changed = false;
        while let Some(u) = self.cluster.poll_update() {
            changed = true;
            match &u {
                Update::Member { name, state, underlay, .. } => {
                    let incarnation = self.cluster.member(name).map_or(0, |m| m.incarnation);
                    tracing::info!(member = %name, state = state.name(), incarnation, %underlay, "member update");
                    // A new incarnation may be a new process: a connection to the old one
                    // would swallow what we send until it times out.
                    // At most one new connection per peer every 2 s for that: a member made to
                    // refute again and again must not cost a handshake each time.
                    let restarted =
                        self.incarnations.insert(name.clone(), incarnation).is_some_and(|i| i != incarnation);
                    let due = self.reconnected.get(name).is_none_or(|t| t.elapsed() > Duration::from_secs(2));
                    if (restarted && due && !state.is_gone()) || state.is_gone() {
                        if restarted {
                            self.reconnected.insert(name.clone(), Instant::now());
                        }
                        self.senders.remove(name);
                    }
                    if state.is_gone() {
                        self.rtts.remove(name);
                    }
                    if let Some(m) = self.cluster.member(name).filter(|m| !m.flow_hash_agrees) {
                        tracing::warn!(member = %m.name, "member computes another flow hash: flows it places by hash may reach the wrong node (mixed versions?)");
                    }
                }
                Update::Removed { name } => {
                    tracing::info!(member = %name, "member forgotten");
                    self.senders.remove(name);
                    self.rtts.remove(name);
                    self.incarnations.remove(name);
                    if let Some(c) = self.connections.remove(name) {
                        c.close(5u32.into(), b"forgotten");
                    }
                }
                Update::Load { .. } | Update::Flow { .. } => {}
            }
            let _ = self.to_dataplane.send(ControlEvent::Cluster(u)).await;
        }
        // Transmits after updates: a restart noticed above replaces the connection first.
        while let Some(t) = self.cluster.poll_transmit() {
            self.send_bytes(&t.to, t.addr, Bytes::from(t.bytes));
        }
        if changed {
            self.publish_status();
        }
    }

    fn publish_status(&self) {
        let view = |m: MemberView| PeerStatus {
            rtt: self.rtts.get(&m.name).copied(),
            load: m.load.map(|(l, _)| l),
            load_age: m.load.map(|(_, at)| self.now().saturating_since(at)),
            name: m.name,
            state: m.state,
            incarnation: m.incarnation,
            underlay: m.underlay,
            weight: m.weight,
            flow_hash_agrees: m.flow_hash_agrees,
        };
        let me = self.cluster.local();
        let mut peers: Vec<PeerStatus> = self.cluster.members().map(view).collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.me = Some(PeerStatus {
            name: me.name.clone(),
            state: me.state,
            incarnation: me.incarnation,
            underlay: me.underlay,
            weight: me.weight,
            rtt: None,
            load: None,
            load_age: None,
            flow_hash_agrees: true,
        });
        s.peers = peers;
        s.stats = self.cluster.stats().clone();
        s.local_health = self.cluster.local_health();
        s.draining = self.draining;
    }
}

/// CPU busy fraction from /proc/stat, between two samples.
#[derive(Debug, Default)]
struct CpuMeter {
    last: Option<(u64, u64)>,
}

impl CpuMeter {
    fn sample(&mut self) -> f32 {
        let Some((busy, total)) = read_proc_stat() else { return 0.0 };
        let frac = match self.last.replace((busy, total)) {
            Some((b0, t0)) if total > t0 => (busy.saturating_sub(b0)) as f32 / (total - t0) as f32,
            _ => 0.0,
        };
        frac.clamp(0.0, 1.0)
    }
}

fn read_proc_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}
