//! `netlab adversary`: a member with a valid certificate that lies.
//!
//! It runs a real [`Cluster`] state machine for its own membership (it answers probes and
//! sends load vectors, so the cluster keeps it as a member and places flows on it, which its
//! own data plane, a `ringlb node` without a control plane, serves), and beside it sends the
//! forgeries of the trust model (`docs/ARCHITECTURE.md`) over the same authenticated
//! connections:
//!
//! - `forge`: the victim dead or suspect at an incarnation it never had, and at the one it has;
//!   a ghost member (hints and reports of a name nobody has); its own weight 3e38; an address
//!   of the victim's claimed as its own; flow recovery's "connection X is served by the victim"
//!   for connections nobody sent it, and claims on UDP flows.
//! - `flood`: a record spoken for the victim (the connection is closed for it), a burst of
//!   messages far beyond its rate, and a burst of handshakes beyond the endpoint's bound.
//!
//! Prints one JSON line of what it sent. For the lab only: it refuses addresses outside it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ringlb_control::tls::{self, TlsFiles};
use ringlb_core::cluster::message::{encode, ClientFlow, FlowMessage, Hint, Message, Record, Report, ReportKind};
use ringlb_core::cluster::{flow_hash_fingerprint, ClusterConfig, Identity, Peer};
use ringlb_core::{Cluster, MemberState, Timestamp};
use tokio::sync::mpsc;

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    Forge,
    Flood,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The lab's PKI directory (`ca.pem`, `<name>.pem`, `<name>.key`).
    pub pki: PathBuf,
    pub name: String,
    /// Its own address (in its certificate): underlay and control.
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Where to join: (name, address).
    pub seed: (String, SocketAddr),
    pub victim: String,
    pub attack: Attack,
    pub seconds: f64,
}

fn in_lab(a: IpAddr) -> bool {
    matches!(a, IpAddr::V4(v4) if v4.octets()[..3] == [10, 77, 0])
}

struct Conns {
    endpoint: quinn::Endpoint,
    out: HashMap<String, quinn::Connection>,
}

impl Conns {
    async fn send(&mut self, name: &str, addr: SocketAddr, bytes: Vec<u8>) -> bool {
        if !in_lab(addr.ip()) {
            return false; // hints may name anything; the lab sends nowhere else
        }
        if self.out.get(name).is_some_and(|c| c.close_reason().is_some()) {
            self.out.remove(name);
        }
        if !self.out.contains_key(name) {
            let Ok(connecting) = self.endpoint.connect(addr, name) else { return false };
            match tokio::time::timeout(Duration::from_millis(500), connecting).await {
                Ok(Ok(c)) => {
                    self.out.insert(name.to_owned(), c);
                }
                _ => return false,
            }
        }
        self.out.get(name).is_some_and(|c| c.send_datagram(bytes.into()).is_ok())
    }
}

/// Runs the attack until `o.seconds` pass or, for a forgery, `stop` fires; returns counts of
/// what was sent, as JSON. Its sockets are those of the calling thread's network namespace.
pub async fn run(o: Options, stop: tokio::sync::oneshot::Receiver<()>) -> Result<String> {
    if !in_lab(IpAddr::V4(o.addr)) || !in_lab(o.seed.1.ip()) {
        bail!("the adversary only plays inside the lab (10.77.0.0/24)");
    }
    let files = TlsFiles {
        ca: o.pki.join("ca.pem"),
        cert: o.pki.join(format!("{}.pem", o.name)),
        key: o.pki.join(format!("{}.key", o.name)),
    };
    let control = SocketAddr::new(IpAddr::V4(o.addr), o.port);
    let mut endpoint = quinn::Endpoint::server(tls::server_config(&files)?, control).context("binding")?;
    endpoint.set_default_client_config(tls::client_config(&files)?);
    // Its own state machine lets any weight through: it announces 3e38.
    let config = ClusterConfig { max_weight: f32::MAX, ..ClusterConfig::default() };
    let identity = Identity {
        name: o.name.clone(),
        underlay: IpAddr::V4(o.addr),
        control,
        weight: 3e38,
        flow_hash: flow_hash_fingerprint(),
        site: "default".into(),
    };
    let origin = Instant::now();
    let now = || Timestamp::from_duration(origin.elapsed());
    let incarnation = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let mut cluster = Cluster::new(identity, u64::try_from(incarnation)?, vec![o.seed.clone()], config, 9, now());
    let (tx, mut rx) = mpsc::channel::<(Arc<Peer>, bytes::Bytes)>(4096);
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Some(name) = tls::peer_name(&conn) else { return };
                let peer = Arc::new(Peer { name, cert_addrs: tls::peer_addrs(&conn), source: conn.remote_address() });
                while let Ok(b) = conn.read_datagram().await {
                    if tx.send((peer.clone(), b)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut conns = Conns { endpoint: endpoint.clone(), out: HashMap::new() };
    let mut sent: HashMap<&'static str, u64> = HashMap::new();
    let end = origin + Duration::from_secs_f64(o.seconds);
    let mut load = tokio::time::interval(Duration::from_millis(250));
    let mut forge = tokio::time::interval(Duration::from_millis(200));
    let mut flooded = false;
    // Only a forgery stops early; a flood runs its course.
    let mut stop = stop;
    let mut stop_armed = o.attack == Attack::Forge;
    while Instant::now() < end {
        let wake = cluster
            .poll_timeout()
            .map_or(origin + Duration::from_secs(1), |t| origin + Duration::from_nanos(t.as_nanos()));
        tokio::select! {
            Some((peer, b)) = rx.recv() => {
                *sent.entry("received").or_default() += 1;
                cluster.handle_datagram(now(), &peer, &b);
            }
            _ = load.tick() => cluster.broadcast_load(0, 0.0, 0.0),
            _ = forge.tick() => {
                let targets: Vec<(String, SocketAddr)> = cluster
                    .members()
                    .filter(|m| m.name != o.victim && matches!(m.state, MemberState::Alive | MemberState::Suspect))
                    .map(|m| (m.name, m.control))
                    .collect();
                let Some(victim) = cluster.member(&o.victim) else { continue };
                let me = cluster.local().clone();
                match o.attack {
                    Attack::Forge => {
                        for (name, addr) in &targets {
                            for (what, msg) in forgeries(&me, &victim.name, victim.incarnation, victim.underlay) {
                                if conns.send(name, *addr, encode(&msg)?).await {
                                    *sent.entry(what).or_default() += 1;
                                }
                            }
                        }
                    }
                    Attack::Flood if !flooded && Instant::now() > origin + Duration::from_secs(3) => {
                        flooded = true;
                        for (name, addr) in &targets {
                            flood(&mut conns, name, *addr, &me, &victim, &mut sent).await?;
                        }
                        handshakes(&files, IpAddr::V4(o.addr), &targets, &mut sent).await;
                    }
                    Attack::Flood => {}
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => cluster.handle_timeout(now()),
            _ = &mut stop, if stop_armed => {
                stop_armed = false;
                if o.attack == Attack::Forge {
                    break;
                }
            }
        }
        while let Some(t) = cluster.poll_transmit() {
            let ok = conns.send(&t.to, t.addr, t.bytes).await;
            *sent.entry(if ok { "protocol" } else { "protocol_unsent" }).or_default() += 1;
        }
        while cluster.poll_update().is_some() {}
    }
    let members: Vec<String> = cluster.members().map(|m| format!("{}:{}", m.name, m.state.name())).collect();
    Ok(serde_json::json!({ "sent": sent, "members": members }).to_string())
}

/// The forgeries of one round, each named.
fn forgeries(me: &Record, victim: &str, incarnation: u64, victim_underlay: IpAddr) -> Vec<(&'static str, Message)> {
    let report = |name: &str, incarnation, kind| Report { name: name.to_owned(), incarnation, kind };
    let announce = |r: Report| Message::Announce { sender: me.clone(), reports: vec![r] };
    let mut stolen = me.clone();
    stolen.underlay = victim_underlay;
    vec![
        ("dead_at_max", announce(report(victim, u64::MAX, ReportKind::Dead))),
        ("suspect_at_max", announce(report(victim, u64::MAX, ReportKind::Suspect))),
        ("dead_at_current", announce(report(victim, incarnation, ReportKind::Dead))),
        ("ghost_report", announce(report("zz", 1, ReportKind::Suspect))),
        (
            "ghost_hint",
            Message::Introduce {
                sender: me.clone(),
                hints: vec![Hint { name: "zz".into(), control: "10.77.0.99:6636".parse().expect("address") }],
            },
        ),
        ("stolen_address", Message::Announce { sender: stolen, reports: vec![] }),
        // Connections of a client nobody placed on this node: no entry asked it about them.
        ("teach_unasked", Message::Flow(FlowMessage::Teach { server: victim.to_owned(), flows: flows(6) })),
        ("claim_udp", Message::Flow(FlowMessage::Serves(flows(17)))),
    ]
}

/// Forty flows of 10.78.0.200, a client address the lab never uses.
fn flows(proto: u8) -> Vec<ClientFlow> {
    (0..40)
        .map(|i| ClientFlow {
            proto,
            client: IpAddr::V4(Ipv4Addr::new(10, 78, 0, 200)),
            client_port: 40_000 + i,
            vip_port: 80,
        })
        .collect()
}

/// A burst far beyond the per-peer rate, then a record spoken for the victim (a leave).
async fn flood(
    conns: &mut Conns,
    name: &str,
    addr: SocketAddr,
    me: &Record,
    victim: &ringlb_core::cluster::MemberView,
    sent: &mut HashMap<&'static str, u64>,
) -> Result<()> {
    let join = encode(&Message::Join { sender: me.clone() })?;
    for _ in 0..5_000 {
        if conns.send(name, addr, join.clone()).await {
            *sent.entry("join_flood").or_default() += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = Record {
        name: victim.name.clone(),
        incarnation: victim.incarnation + 1,
        state: MemberState::Left,
        underlay: victim.underlay,
        control: victim.control,
        weight: victim.weight,
        flow_hash: me.flow_hash,
        site: victim.site.clone(),
    };
    if conns.send(name, addr, encode(&Message::Announce { sender: left, reports: vec![] })?).await {
        *sent.entry("victim_leaves").or_default() += 1;
    }
    Ok(())
}

/// Many handshakes at once, each from a new endpoint.
async fn handshakes(
    files: &TlsFiles,
    ip: IpAddr,
    targets: &[(String, SocketAddr)],
    sent: &mut HashMap<&'static str, u64>,
) {
    let Ok(client) = tls::client_config(files) else { return };
    let mut tasks = Vec::new();
    for (name, addr) in targets {
        for _ in 0..150 {
            let Ok(mut ep) = quinn::Endpoint::client(SocketAddr::new(ip, 0)) else { continue };
            ep.set_default_client_config(client.clone());
            let (name, addr) = (name.clone(), *addr);
            tasks.push(tokio::spawn(async move {
                let ok = match ep.connect(addr, &name) {
                    Ok(c) => tokio::time::timeout(Duration::from_secs(2), c).await.is_ok_and(|r| r.is_ok()),
                    Err(_) => false,
                };
                ep.close(0u32.into(), b"");
                ok
            }));
        }
    }
    let mut ok = 0;
    let n = tasks.len() as u64;
    for t in tasks {
        ok += u64::from(t.await.unwrap_or(false));
    }
    sent.insert("handshakes", n);
    sent.insert("handshakes_completed", ok);
}

/// A play of the adversary on a lab host's thread; see [`Lab::adversary`].
#[derive(Debug)]
pub struct Play {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: std::thread::JoinHandle<Result<String>>,
}

impl Play {
    /// Stops a forgery (a flood runs its course) and returns what it sent, as JSON.
    pub fn finish(mut self) -> Result<String> {
        drop(self.stop.take());
        self.thread.join().map_err(|_| anyhow::anyhow!("the adversary thread panicked"))?
    }
}

impl crate::Lab {
    /// Starts the adversary inside lab host `host` (its network namespace), on a thread of
    /// its own with a single-threaded runtime.
    pub fn adversary(&self, host: &str, o: Options) -> Result<Play> {
        let (stop_tx, stop) = tokio::sync::oneshot::channel();
        let thread = self.in_host(host, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run(o, stop))
        })?;
        Ok(Play { stop: Some(stop_tx), thread })
    }
}
