//! The control-plane driver: one QUIC endpoint per node, carrying the core's membership
//! messages and the load vectors as datagrams.
//!
//! Each node sends on connections it opens (one per peer, to the peer's node name, verified)
//! and receives on connections peers open to it (authenticated by their client certificate).
//! The name in a peer's certificate is its identity: a `Join` that claims another name, a
//! handshake without a cluster certificate, and a malformed or oversized message are refused,
//! counted, and the connection closed. Connection loss and failed sends are the fast failure
//! signal fed to the membership state machine.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringlb_core::membership::{Identity, Membership, MembershipConfig, MembershipEvent};
use ringlb_core::{LocalLoad, MemberState, Timestamp};
use ringlb_wire::control::{decode, encode, LoadVector, Message, UpdateState};
use tokio::sync::{mpsc, watch};

use crate::tls::{self, TlsFiles};

/// Everything the control plane needs to start.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub identity: Identity,
    /// Address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// `(name, address)` of nodes to join through.
    pub seeds: Vec<(String, SocketAddr)>,
    pub tls: TlsFiles,
    pub membership: MembershipConfig,
    /// How often this node sends its load vector to every peer.
    pub load_interval: Duration,
    /// Must grow across restarts: wall-clock milliseconds at start.
    pub incarnation: u64,
}

/// What the control plane tells the data plane.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlEvent {
    Member { name: String, underlay: IpAddr, weight: f64, state: MemberState },
    Load { name: String, load: LoadVector },
    Drain(bool),
}

/// One member as `ringlb status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub state: UpdateState,
    pub incarnation: u64,
    pub underlay: IpAddr,
    pub rtt: Option<Duration>,
    pub load: Option<LoadVector>,
    pub load_age: Option<Duration>,
}

/// Peers and messages refused, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Handshakes that failed: no certificate, or one not from the cluster CA.
    pub tls: u64,
    /// A certificate without a node name, or a message claiming another name.
    pub identity: u64,
    /// Undecodable or oversized messages.
    pub malformed: u64,
}

/// How often this node saw a peer become suspect or dead: a node that flaps (declares live
/// peers dead under load) shows here, even if it is refuted a moment later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transitions {
    pub suspect: u64,
    pub dead: u64,
}

#[derive(Debug, Default)]
struct Status {
    me: Option<PeerStatus>,
    peers: HashMap<String, PeerStatus>,
    refusals: Refusals,
    transitions: Transitions,
    draining: bool,
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
}

impl ControlHandle {
    /// This node first, then its peers by name.
    pub fn members(&self) -> Vec<PeerStatus> {
        let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let mut peers: Vec<PeerStatus> = s.peers.values().cloned().collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        s.me.iter().cloned().chain(peers).collect()
    }

    pub fn refusals(&self) -> Refusals {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).refusals
    }

    pub fn transitions(&self) -> Transitions {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).transitions
    }

    pub fn draining(&self) -> bool {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).draining
    }

    pub async fn drain(&self, on: bool) -> bool {
        self.commands.send(Command::Drain(on)).await.is_ok()
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
    Datagram { from: String, bytes: Bytes, conn: quinn::Connection },
    Refused(&'static str),
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
    let mut endpoint = quinn::Endpoint::server(server, config.listen)
        .map_err(|source| ControlError::Bind { addr: config.listen, source })?;
    endpoint.set_default_client_config(client);
    let status = Arc::new(Mutex::new(Status::default()));
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let handle = ControlHandle { status: status.clone(), commands: cmd_tx };
    let (in_tx, in_rx) = mpsc::channel(4096);
    tokio::spawn(accept_loop(endpoint.clone(), in_tx.clone()));
    let task = tokio::spawn(async move {
        let mut c = Control::new(config, endpoint, status, in_tx, to_dataplane);
        c.run(in_rx, cmd_rx, local_load, shutdown).await;
    });
    Ok((handle, task))
}

async fn accept_loop(endpoint: quinn::Endpoint, tx: mpsc::Sender<Inbound>) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "control handshake refused");
                    let _ = tx.send(Inbound::Refused("tls")).await;
                    return;
                }
            };
            let Some(from) = tls::peer_name(&conn) else {
                conn.close(1u32.into(), b"no node name in certificate");
                let _ = tx.send(Inbound::Refused("identity")).await;
                return;
            };
            tracing::debug!(peer = %from, addr = %conn.remote_address(), "control connection accepted");
            while let Ok(bytes) = conn.read_datagram().await {
                if tx.send(Inbound::Datagram { from: from.clone(), bytes, conn: conn.clone() }).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Owns the outgoing connection to one peer: connects by name, sends what it is given, and
/// reports the peer unreachable when connecting or sending fails or the connection drops.
async fn peer_sender(
    endpoint: quinn::Endpoint,
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
            let connecting = match endpoint.connect(addr, &name) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(peer = %name, error = %e, "cannot connect");
                    let _ = tx.send(Inbound::Unreachable(name.clone())).await;
                    continue;
                }
            };
            match tokio::time::timeout(Duration::from_secs(1), connecting).await {
                Ok(Ok(c)) => conn = Some((addr, c)),
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
    membership: Membership,
    origin: Instant,
    status: Arc<Mutex<Status>>,
    inbound: mpsc::Sender<Inbound>,
    to_dataplane: mpsc::Sender<ControlEvent>,
    senders: HashMap<String, mpsc::Sender<(SocketAddr, Bytes)>>,
    loads: HashMap<String, (LoadVector, Instant)>,
    rtts: HashMap<String, Duration>,
    /// Last incarnation seen per member, to notice restarts.
    incarnations: HashMap<String, u64>,
    /// Each member's last state, to count its changes.
    states: HashMap<String, UpdateState>,
    draining: bool,
    cpu: CpuMeter,
    last_new_flows: Option<(u64, Instant)>,
}

impl Control {
    fn new(
        config: ControlConfig,
        endpoint: quinn::Endpoint,
        status: Arc<Mutex<Status>>,
        inbound: mpsc::Sender<Inbound>,
        to_dataplane: mpsc::Sender<ControlEvent>,
    ) -> Self {
        let membership = Membership::new(
            config.identity.clone(),
            config.incarnation,
            config.seeds.clone(),
            config.membership.clone(),
            config.incarnation,
            Timestamp::ZERO,
        );
        Control {
            config,
            endpoint,
            membership,
            origin: Instant::now(),
            status,
            inbound,
            to_dataplane,
            senders: HashMap::new(),
            loads: HashMap::new(),
            rtts: HashMap::new(),
            incarnations: HashMap::new(),
            states: HashMap::new(),
            draining: false,
            cpu: CpuMeter::default(),
            last_new_flows: None,
        }
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.origin.elapsed())
    }

    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut commands: mpsc::Receiver<Command>,
        local_load: watch::Receiver<LocalLoad>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut load_tick = tokio::time::interval(self.config.load_interval);
        load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(name = %self.membership.name(), incarnation = self.membership.incarnation(), "control plane running");
        loop {
            let deadline = self
                .membership
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
                        let _ = self.to_dataplane.send(ControlEvent::Drain(on)).await;
                        tracing::info!(draining = on, "drain state changed");
                    }
                },
                _ = load_tick.tick() => {
                    let load = *local_load.borrow();
                    self.send_load(load);
                }
                () = sleep => {
                    let now = self.now();
                    self.membership.handle_timeout(now);
                }
                _ = shutdown.changed() => {
                    self.membership.leave();
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
            Inbound::Refused(why) => {
                let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
                match why {
                    "tls" => s.refusals.tls += 1,
                    _ => s.refusals.identity += 1,
                }
            }
            Inbound::Unreachable(name) => self.membership.report_unreachable(&name, now),
            Inbound::Rtt(name, rtt) => {
                self.rtts.insert(name, rtt);
            }
            Inbound::Datagram { from, bytes, conn } => {
                let msg = match decode(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(peer = %from, error = %e, len = bytes.len(), "malformed control message; closing");
                        self.status.lock().unwrap_or_else(|e| e.into_inner()).refusals.malformed += 1;
                        conn.close(2u32.into(), b"malformed message");
                        return;
                    }
                };
                if let Message::Join { gossip } = &msg {
                    if gossip.first().is_none_or(|u| u.name != from) {
                        tracing::warn!(peer = %from, "join claims another name; closing");
                        self.status.lock().unwrap_or_else(|e| e.into_inner()).refusals.identity += 1;
                        conn.close(3u32.into(), b"identity mismatch");
                        return;
                    }
                }
                // Any other message is heard from any peer holding a cluster certificate:
                // that is what membership means. Who it may talk about is SWIM's business.
                if let Message::Load(load) = msg {
                    self.loads.insert(from.clone(), (load, Instant::now()));
                    let _ = self.to_dataplane.try_send(ControlEvent::Load { name: from, load });
                } else {
                    self.membership.handle(now, &from, msg);
                }
            }
        }
    }

    fn send_load(&mut self, load: LocalLoad) {
        let now = Instant::now();
        let rate = match self.last_new_flows.replace((load.served_new_flows, now)) {
            Some((before, at)) => {
                (load.served_new_flows.saturating_sub(before)) as f32 / now.duration_since(at).as_secs_f32().max(1e-3)
            }
            None => 0.0,
        };
        let vector = LoadVector {
            incarnation: self.membership.incarnation(),
            served_flows: load.served_flows,
            new_flows_per_sec: rate,
            cpu: self.cpu.sample(),
            weight: self.config.identity.weight,
            draining: self.draining,
        };
        let Some(bytes) = encode(&Message::Load(vector)) else { return };
        let bytes = Bytes::from(bytes);
        let targets: Vec<(String, SocketAddr)> = self
            .membership
            .peers()
            .filter(|p| matches!(p.state, UpdateState::Alive | UpdateState::Suspect))
            .map(|p| (p.name.clone(), p.control))
            .collect();
        for (name, addr) in targets {
            self.send_bytes(&name, addr, bytes.clone());
        }
        self.publish_status(Some(vector));
    }

    fn send_bytes(&mut self, name: &str, addr: SocketAddr, bytes: Bytes) {
        let tx = self.senders.entry(name.to_owned()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(256);
            tokio::spawn(peer_sender(self.endpoint.clone(), name.to_owned(), rx, self.inbound.clone()));
            tx
        });
        // A full queue means the peer is not keeping up; the probe will notice.
        let _ = tx.try_send((addr, bytes));
    }

    async fn flush(&mut self) {
        let mut changed = false;
        while let Some(MembershipEvent::Member(u)) = self.membership.poll_event() {
            changed = true;
            tracing::info!(member = %u.name, state = ?u.state, incarnation = u.incarnation, "member update");
            // Count changes of state only: an update that leaves a member suspect or dead (a
            // new address, a higher incarnation) is no new suspicion or death.
            let before = self.states.insert(u.name.clone(), u.state);
            if before != Some(u.state) && matches!(u.state, UpdateState::Suspect | UpdateState::Dead) {
                let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
                match u.state {
                    UpdateState::Suspect => s.transitions.suspect += 1,
                    _ => s.transitions.dead += 1,
                }
            }
            // A new incarnation may be a new process: a connection to the old one would
            // swallow what we send until it times out.
            let restarted = self.incarnations.insert(u.name.clone(), u.incarnation).is_some_and(|i| i != u.incarnation);
            if restarted && u.state == UpdateState::Alive {
                self.senders.remove(&u.name);
            }
            if matches!(u.state, UpdateState::Dead | UpdateState::Left) {
                // Dropping its sender ends the task and closes the connection.
                self.senders.remove(&u.name);
                self.loads.remove(&u.name);
                self.rtts.remove(&u.name);
            }
            let state = match u.state {
                UpdateState::Alive => MemberState::Alive,
                UpdateState::Suspect => MemberState::Suspect,
                UpdateState::Dead | UpdateState::Left => MemberState::Dead,
            };
            let ev = ControlEvent::Member { name: u.name, underlay: u.underlay, weight: f64::from(u.weight), state };
            let _ = self.to_dataplane.send(ev).await;
        }
        // Transmits after events: a restart noticed above replaces the connection first.
        while let Some(t) = self.membership.poll_transmit() {
            match encode(&t.msg) {
                Some(bytes) => self.send_bytes(&t.to_name, t.to_addr, Bytes::from(bytes)),
                None => tracing::warn!(to = %t.to_name, "control message too large; not sent"),
            }
        }
        if changed {
            self.publish_status(None);
        }
    }

    fn publish_status(&self, my_load: Option<LoadVector>) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let me = self.membership.local();
        let prev_load = s.me.as_ref().and_then(|m| m.load);
        s.me = Some(PeerStatus {
            name: me.name.clone(),
            state: me.state,
            incarnation: me.incarnation,
            underlay: me.underlay,
            rtt: None,
            load: my_load.or(prev_load),
            load_age: Some(Duration::ZERO),
        });
        s.draining = self.draining;
        s.peers = self
            .membership
            .peers()
            .map(|p| {
                let load = self.loads.get(&p.name);
                (
                    p.name.clone(),
                    PeerStatus {
                        name: p.name.clone(),
                        state: p.state,
                        incarnation: p.incarnation,
                        underlay: p.underlay,
                        rtt: self.rtts.get(&p.name).copied(),
                        load: load.map(|(l, _)| *l),
                        load_age: load.map(|(_, at)| at.elapsed()),
                    },
                )
            })
            .collect();
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
