//! The cluster state machine: who the members are, whether they are alive, and how loaded.
//!
//! Fed authenticated datagrams (the control channel vouches for the sender's certificate name,
//! its certificate's IP addresses and the connection's source address) and time; answers with
//! datagrams to send ([`Cluster::poll_transmit`]) and member and load changes for the data
//! plane ([`Cluster::poll_update`]). Sans-IO, like quinn-proto: no sockets, no clock, no hidden
//! randomness.
//!
//! **Self-authority.** A member's incarnation, state (alive, draining, left), addresses, weight,
//! flow-hash fingerprint and load come only from that member, over its own authenticated
//! connection ([`message::Record`]). A member exists only once it has spoken for itself; its
//! addresses must be among its certificate's IP addresses, and its control address must be
//! the source of its connection. Another member may only *report* that it did not answer, at
//! an incarnation the receiver has seen from it: such a report makes the receiver probe it at
//! once and, if its own probe fails too, shortens its suspicion (a confirmation). No report
//! makes a member suspect or dead by itself, and a member can always refute: a report about
//! itself at its current incarnation makes it raise its incarnation and announce itself to
//! every peer (at most once per probe interval); a report at an incarnation it never had is a
//! lie, refused and counted. Hints of other members are taken only in answer to this node's
//! own `Join`.
//!
//! **Failure detection** is SWIM with Lifeguard's refinements: probes in a shuffled
//! round-robin, indirect probes through `indirect_probes` helpers who answer with a nack when
//! the target is silent for them too (with nobody to ask, in a cluster of two, the direct ping
//! is sent once more instead, so one lost datagram makes no suspicion), a suspicion whose
//! timeout shrinks from `suspicion_max_mult × min` towards `min` with independent
//! confirmations, and *local health*:
//! a node that sees signs of its own starvation (its timers firing late, probes failing while
//! helpers' nacks do not arrive) widens its own probe and suspicion timeouts (unlike Lifeguard,
//! not for having to refute: reports are others' claims, and must not slow a node down),
//! so that a node that is slow does not declare the living dead. A stall longer than a probe
//! period voids the probe in flight and pushes every suspicion's deadline back by the stall.
//!
//! **Bounds.** The member table has a cap; weights are clamped to a range; implausible load
//! vectors are refused; answers to `Join` and relays for `PingReq` are rate-limited per peer;
//! dead and left members are forgotten after `dead_expiry`, and a dead member's addresses go to
//! the live member that claims them. Every refusal is counted by [`Refusal`].

pub mod message;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hashbrown::HashMap;

use crate::{MemberState, Rng, Timestamp};
use message::{decode, encode, DecodeError, Hint, LoadVector, Message, Record, Report, ReportKind, MAX_MESSAGE};
pub use message::{ClientFlow, FlowMessage, MAX_FLOWS};

/// Tuning of the cluster protocol and its bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub probe_interval: Duration,
    /// Wait for a direct ack before asking others to probe.
    pub probe_timeout: Duration,
    pub indirect_probes: usize,
    /// The shortest a suspicion lasts before death (with every confirmation it can get),
    /// scaled by log10 of the cluster size.
    pub suspicion_timeout: Duration,
    /// The longest a suspicion lasts, as a multiple of the shortest (no confirmation).
    pub suspicion_max_mult: u32,
    /// Most a starved node widens its timeouts by: up to `1 + max_local_health` times.
    pub max_local_health: u32,
    /// Each report is piggybacked `retransmit_mult * ceil(log2(N + 1))` times.
    pub retransmit_mult: u32,
    /// How often a node that knows no live peer asks its seeds again, and contacts one dead
    /// member to see if it is back.
    pub join_retry: Duration,
    /// How long a dead or left member is remembered before its name and addresses are freed.
    pub dead_expiry: Duration,
    /// Most members, this node included.
    pub max_members: usize,
    /// Weights members may announce; others are clamped into it.
    pub min_weight: f32,
    pub max_weight: f32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(80),
            indirect_probes: 3,
            suspicion_timeout: Duration::from_millis(2000),
            suspicion_max_mult: 3,
            max_local_health: 8,
            retransmit_mult: 4,
            join_retry: Duration::from_secs(1),
            dead_expiry: Duration::from_secs(60),
            max_members: 1024,
            min_weight: 0.0,
            max_weight: 100.0,
        }
    }
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub name: String,
    pub underlay: IpAddr,
    pub control: SocketAddr,
    pub weight: f32,
    /// Fingerprint of this node's flow hash ([`flow_hash_fingerprint`]): members that disagree
    /// place fallback flows differently.
    pub flow_hash: u64,
    /// The site this node is in (`node.site`).
    pub site: String,
}

/// What the control channel vouches for about the sender of a datagram.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// The node name in its certificate.
    pub name: String,
    /// The IP addresses its certificate names.
    pub cert_addrs: Vec<IpAddr>,
    /// The source address of its connection.
    pub source: SocketAddr,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    pub to: String,
    pub addr: SocketAddr,
    pub bytes: Vec<u8>,
}

/// A member's load, as it reported it (weight clamped), for placement.
pub type PeerLoad = LoadVector;

/// A change for the data plane.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A member appeared or changed state, address, weight or site.
    Member { name: String, underlay: IpAddr, weight: f64, state: MemberState, site: String },
    /// A member's latest load vector.
    Load { name: String, load: PeerLoad },
    /// A member is forgotten: its name and address are free.
    Removed { name: String },
    /// Flow recovery from a live member, for the data plane to check and apply.
    Flow { from: String, msg: FlowMessage },
}

/// Why a peer or a message was refused. Counted in `ringlb_control_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// No certificate, or one not from the cluster CA.
    Tls,
    /// A certificate without a node name, or a message speaking for another name.
    Identity,
    /// Undecodable or oversized.
    Malformed,
    /// A message type this version does not know (skipped, not an error).
    UnknownType,
    /// A claimed address that is not in the certificate or not the connection's source.
    Address,
    /// A claimed address that a live member holds.
    AddressInUse,
    /// The member table is full.
    TableFull,
    /// A report, relay request or load from or about a name that is not a member.
    NotMember,
    /// A report at an incarnation its subject never had.
    Incarnation,
    /// A weight outside the configured range (clamped, not refused).
    WeightClamped,
    /// A load vector out of any plausible range.
    ImplausibleLoad,
    /// More messages, joins or relay requests than a peer may send.
    RateLimited,
    /// Too many handshakes at once.
    HandshakeLimit,
}

impl Refusal {
    pub const ALL: [Refusal; 13] = [
        Refusal::Tls,
        Refusal::Identity,
        Refusal::Malformed,
        Refusal::UnknownType,
        Refusal::Address,
        Refusal::AddressInUse,
        Refusal::TableFull,
        Refusal::NotMember,
        Refusal::Incarnation,
        Refusal::WeightClamped,
        Refusal::ImplausibleLoad,
        Refusal::RateLimited,
        Refusal::HandshakeLimit,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Tls => "tls",
            Refusal::Identity => "identity",
            Refusal::Malformed => "malformed",
            Refusal::UnknownType => "unknown_type",
            Refusal::Address => "address",
            Refusal::AddressInUse => "address_in_use",
            Refusal::TableFull => "table_full",
            Refusal::NotMember => "not_member",
            Refusal::Incarnation => "incarnation",
            Refusal::WeightClamped => "weight_clamped",
            Refusal::ImplausibleLoad => "implausible_load",
            Refusal::RateLimited => "rate_limited",
            Refusal::HandshakeLimit => "handshake_limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the driver must do with the connection a datagram came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Refused and counted; the connection may stay.
    Refused(Refusal),
    /// Refused and counted; close the connection (a broken or lying peer).
    Close(Refusal),
}

/// Counters of the cluster protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    refused: [u64; Refusal::ALL.len()],
    /// Times a peer became suspect in this node's view.
    pub suspected: u64,
    /// Times a peer became dead in this node's view.
    pub died: u64,
    /// Times this node refuted a suspicion of itself.
    pub refuted: u64,
}

impl Stats {
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r.index()]
    }
}

/// One member as this node sees it, for status.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub name: String,
    pub state: MemberState,
    pub incarnation: u64,
    pub underlay: IpAddr,
    pub control: SocketAddr,
    pub weight: f32,
    /// Its latest load vector and when it arrived.
    pub load: Option<(LoadVector, Timestamp)>,
    /// Whether it computes the same flow hash as this node.
    pub flow_hash_agrees: bool,
    pub site: String,
}

#[derive(Debug, Clone)]
struct Suspicion {
    since: Timestamp,
}

#[derive(Debug, Clone)]
struct Member {
    /// What it last said of itself.
    record: Record,
    /// This node's view: the record's state, or suspect or dead.
    state: MemberState,
    suspicion: Option<Suspicion>,
    /// Distinct members that reported it at its current incarnation.
    reporters: Vec<String>,
    /// When it died or left.
    gone_at: Option<Timestamp>,
    load: Option<(LoadVector, Timestamp)>,
    last_introduce: Option<Timestamp>,
    last_notice: Option<Timestamp>,
    relays: u8,
    /// Round trips measured to it (direct probes answered), or seeded by the driver.
    rtt: Option<RttEstimate>,
}

/// RFC 6298's smoothed round trip and its variation.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RttEstimate {
    srtt: Duration,
    rttvar: Duration,
}

impl RttEstimate {
    fn first(sample: Duration) -> Self {
        RttEstimate { srtt: sample, rttvar: sample / 2 }
    }

    fn update(&mut self, sample: Duration) {
        let delta = self.srtt.abs_diff(sample);
        self.rttvar = self.rttvar.mul_f64(0.75) + delta.mul_f64(0.25);
        self.srtt = self.srtt.mul_f64(0.875) + sample.mul_f64(0.125);
    }

    /// How long an answer may take before it is late: the retransmission timeout.
    fn timeout(&self) -> Duration {
        self.srtt + 4 * self.rttvar
    }
}

/// The longest a direct probe waits, however slow a peer's path (a round trip of a few hundred
/// milliseconds, as across continents, fits): beyond that it is not a WAN but a broken path,
/// which indirect probes are for. It also bounds how long one slow member can hold up a
/// round, in which nobody else is probed.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl Member {
    fn live(&self) -> bool {
        matches!(self.state, MemberState::Alive | MemberState::Draining | MemberState::Suspect)
    }
}

#[derive(Debug, Clone)]
struct Probe {
    target: String,
    seq: u64,
    started: Timestamp,
    /// When to ask helpers (the target's timeout, scaled by local health).
    timeout: Duration,
    helpers: Vec<String>,
    nacked: Vec<String>,
    indirect_sent: bool,
}

#[derive(Debug, Clone)]
struct Relay {
    seq: u64,
    target: String,
    origin: String,
    origin_seq: u64,
    nack_at: Timestamp,
    nacked: bool,
    end: Timestamp,
}

#[derive(Debug, Clone)]
struct PendingHint {
    control: SocketAddr,
    attempts: u32,
    next_at: Timestamp,
}

/// Most relays one peer may have outstanding.
const MAX_RELAYS_PER_PEER: u8 = 4;
/// Most hints kept at once.
const MAX_HINTS: usize = 256;
/// Most hints in one answer to `Join`.
const HINTS_PER_REPLY: usize = 32;
/// Times a hint is tried before it is dropped.
const HINT_ATTEMPTS: u32 = 5;
/// Load vectors beyond these are lies.
const MAX_PLAUSIBLE_RATE: f32 = 1e7;

/// One node's view of the cluster. See the module documentation.
#[derive(Debug)]
pub struct Cluster {
    config: ClusterConfig,
    me: Record,
    members: HashMap<String, Member, foldhash::fast::FixedState>,
    seeds: Vec<(String, SocketAddr)>,
    hints: HashMap<String, PendingHint, foldhash::fast::FixedState>,
    rng: Rng,
    next_seq: u64,
    probe: Option<Probe>,
    probe_order: Vec<String>,
    /// Members to probe before the round-robin order (reported, unreachable, holding an
    /// address someone else claims).
    urgent: VecDeque<String>,
    next_probe: Timestamp,
    next_join: Timestamp,
    relays: Vec<Relay>,
    gossip: Vec<(Report, u32)>,
    /// Local health: 0 (healthy) to `max_local_health`; timeouts are scaled by `1 + health`.
    health: u32,
    last_refutation: Option<Timestamp>,
    /// Whom this node sent a Join, and when: only their answers may bring hints.
    joined: HashMap<String, Timestamp, foldhash::fast::FixedState>,
    outbox: VecDeque<Transmit>,
    updates: VecDeque<Update>,
    stats: Stats,
    /// Carried in this node's load vectors: it claims the VIP at layer 2.
    entry_claim: bool,
    /// Carried in this node's load vectors: it may be elected to own the VIP at layer 2.
    entry_candidate: bool,
    /// Carried in this node's load vectors: its app fails its health checks.
    app_unhealthy: bool,
}

impl Cluster {
    /// `incarnation` must exceed any this node used before (e.g. wall-clock milliseconds), so
    /// that a restarted node overrides what the cluster remembers of its previous life.
    pub fn new(
        identity: Identity,
        incarnation: u64,
        seeds: Vec<(String, SocketAddr)>,
        config: ClusterConfig,
        seed: u64,
        now: Timestamp,
    ) -> Self {
        let me = Record {
            name: identity.name,
            incarnation,
            state: MemberState::Alive,
            underlay: identity.underlay,
            control: identity.control,
            weight: identity.weight.clamp(config.min_weight, config.max_weight),
            flow_hash: identity.flow_hash,
            site: identity.site,
        };
        let seeds = seeds.into_iter().filter(|(n, _)| *n != me.name).collect();
        Cluster {
            config,
            me,
            members: HashMap::with_hasher(foldhash::fast::FixedState::with_seed(seed)),
            seeds,
            hints: HashMap::with_hasher(foldhash::fast::FixedState::with_seed(seed ^ 1)),
            rng: Rng::seed(seed),
            next_seq: 1,
            probe: None,
            probe_order: Vec::new(),
            urgent: VecDeque::new(),
            next_probe: now,
            next_join: now,
            relays: Vec::new(),
            gossip: Vec::new(),
            health: 0,
            last_refutation: None,
            joined: HashMap::with_hasher(foldhash::fast::FixedState::with_seed(seed ^ 2)),
            outbox: VecDeque::new(),
            updates: VecDeque::new(),
            stats: Stats::default(),
            entry_claim: false,
            entry_candidate: false,
            app_unhealthy: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.me.name
    }

    /// This node's own record.
    pub fn local(&self) -> &Record {
        &self.me
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Local health: 0 when healthy; timeouts are scaled by `1 + local_health()`.
    pub fn local_health(&self) -> u32 {
        self.health
    }

    /// Counts a refusal the driver made (handshakes, rate limits).
    pub fn count(&mut self, r: Refusal) {
        self.stats.refused[r.index()] += 1;
    }

    /// This node's view of a member.
    pub fn member(&self, name: &str) -> Option<MemberView> {
        self.members.get(name).map(|m| self.view(m))
    }

    /// Every member but this node, in no particular order.
    pub fn members(&self) -> impl Iterator<Item = MemberView> + '_ {
        self.members.values().map(|m| self.view(m))
    }

    fn view(&self, m: &Member) -> MemberView {
        MemberView {
            name: m.record.name.clone(),
            state: m.state,
            incarnation: m.record.incarnation,
            underlay: m.record.underlay,
            control: m.record.control,
            weight: m.record.weight,
            load: m.load,
            flow_hash_agrees: m.record.flow_hash == self.me.flow_hash,
            site: m.record.site.clone(),
        }
    }

    /// Whether this node may still send to `name`: a member, a seed, or a hint being tried.
    /// The driver drops its connections to anyone else.
    pub fn knows(&self, name: &str) -> bool {
        self.members.contains_key(name) || self.hints.contains_key(name) || self.seeds.iter().any(|(n, _)| n == name)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    pub fn poll_update(&mut self) -> Option<Update> {
        self.updates.pop_front()
    }

    fn scale(&self, d: Duration) -> Duration {
        d * (1 + self.health)
    }

    fn live_members(&self) -> usize {
        self.members.values().filter(|m| m.live()).count()
    }

    fn retransmits(&self) -> u32 {
        let n = u32::try_from(self.members.len() + 1).unwrap_or(u32::MAX);
        self.config.retransmit_mult * (u32::BITS - n.leading_zeros()).max(1)
    }

    /// Lifeguard's dynamic suspicion timeout, for a suspicion with `confirmations`.
    fn suspicion_timeout(&self, confirmations: usize) -> Duration {
        let n = self.live_members() + 1;
        let min = self.config.suspicion_timeout.mul_f64((n as f64).log10().max(1.0));
        let max = min * self.config.suspicion_max_mult.max(1);
        let k = self.config.indirect_probes.min(n.saturating_sub(2));
        let t = if k == 0 {
            min
        } else {
            let c = confirmations.min(k) as f64;
            let frac = (c + 1.0).ln() / (k as f64 + 1.0).ln();
            max.saturating_sub((max.saturating_sub(min)).mul_f64(frac)).max(min)
        };
        self.scale(t)
    }

    fn suspicion_deadline(&self, m: &Member) -> Option<Timestamp> {
        let s = m.suspicion.as_ref()?;
        // A far member's refutation takes longer to come back: at least four of its rounds.
        let floor = self.scale(self.round_for(&m.record.name) * 4);
        Some(s.since.saturating_add(self.suspicion_timeout(m.reporters.len()).max(floor)))
    }

    /// How long a direct probe of `name` waits before asking helpers: `probe_timeout` on a
    /// fast path, the member's measured retransmission timeout on a slow one (a WAN).
    fn probe_timeout_for(&self, name: &str) -> Duration {
        let measured = self.members.get(name).and_then(|m| m.rtt).map_or(Duration::ZERO, |r| r.timeout());
        self.config.probe_timeout.max(measured.min(MAX_PROBE_TIMEOUT))
    }

    /// A protocol round with `name` as the target: `probe_interval`, plus twice what its probe
    /// timeout adds to the LAN's (the direct probe waits that much longer, and the helpers'
    /// answers travel as far): at most about 2 s more, with [`MAX_PROBE_TIMEOUT`].
    fn round_for(&self, name: &str) -> Duration {
        let extra = self.probe_timeout_for(name).saturating_sub(self.config.probe_timeout);
        self.config.probe_interval + 2 * extra
    }

    /// A round trip to `name` measured outside the membership protocol (the driver's QUIC
    /// connection): it seeds the estimate, so that a far member's first probes already wait
    /// long enough. Samples from direct probes refine it.
    pub fn observe_rtt(&mut self, name: &str, rtt: Duration) {
        if let Some(m) = self.members.get_mut(name) {
            if m.rtt.is_none() {
                m.rtt = Some(RttEstimate::first(rtt.min(MAX_PROBE_TIMEOUT)));
            }
        }
    }

    /// The probe timeout this node uses for `name` now (for status).
    pub fn probe_timeout_of(&self, name: &str) -> Duration {
        self.scale(self.probe_timeout_for(name))
    }

    /// When [`Cluster::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut t = self.next_probe;
        if let Some(p) = &self.probe {
            if !p.indirect_sent {
                t = t.min(p.started.saturating_add(p.timeout));
            }
        }
        // The join round always runs (a second apart): it is also the clock that local
        // health measures lateness against.
        t = t.min(self.next_join);
        for h in self.hints.values() {
            t = t.min(h.next_at);
        }
        for m in self.members.values() {
            if let Some(d) = self.suspicion_deadline(m) {
                t = t.min(d);
            }
            if let Some(g) = m.gone_at {
                t = t.min(g.saturating_add(self.config.dead_expiry));
            }
        }
        for r in &self.relays {
            t = t.min(if r.nacked { r.end } else { r.nack_at });
        }
        Some(t)
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        let keep = self.config.join_retry * 5;
        self.joined.retain(|_, at| now < at.saturating_add(keep));
        // Local health: a timer that fires late means this node is starved, and what it
        // concludes from silence is suspect itself. Lateness counts against the two timers
        // set at fixed times (the probe round, and the join round every `join_retry`), so a
        // stall longer than a second is seen however long the scaled probe round is; other
        // deadlines can move earlier (a suspicion confirmed) and would look late.
        let due = self.next_probe.min(self.next_join);
        let lag = now.saturating_since(due);
        if lag > self.config.probe_interval / 2 {
            self.raise_health(if lag > self.config.probe_interval { 2 } else { 1 });
        }
        if lag > self.config.probe_interval {
            // Stalled: the probe in flight judged nobody, and no refutation could have been
            // heard while this node did not run.
            self.probe = None;
            for m in self.members.values_mut() {
                if let Some(s) = &mut m.suspicion {
                    s.since = s.since.saturating_add(lag);
                }
            }
            self.next_probe = now;
        }
        self.joins(now);
        self.contact_hints(now);
        // Direct probe unanswered: ask others.
        if let Some(p) = &mut self.probe {
            if !p.indirect_sent && now >= p.started.saturating_add(p.timeout) {
                p.indirect_sent = true;
                let (target, seq) = (p.target.clone(), p.seq);
                let helpers = self.helpers_for(self.config.indirect_probes, &target);
                for h in &helpers {
                    self.send(h, &Message::PingReq { seq, target: target.clone() });
                }
                if helpers.is_empty() {
                    // Nobody to ask (a cluster of two): ask the target once more, so that one
                    // lost ping or ack does not make it suspect. The round still ends at the
                    // same time; the ack, to either ping, no longer times the path.
                    self.ping(&target, seq);
                }
                if let Some(p) = &mut self.probe {
                    p.helpers = helpers;
                }
            }
        }
        // End of the protocol round: an unanswered probe makes its target suspect.
        if now >= self.next_probe {
            if let Some(p) = self.probe.take() {
                let missing = p.helpers.len() - p.nacked.len().min(p.helpers.len());
                self.raise_health(if p.helpers.is_empty() { 1 } else { u32::try_from(missing).unwrap_or(1) });
                // A new suspect is probed once more next round, told again that it is
                // suspected: it is the one that must refute, and the first notice may be lost.
                if self.suspect(&p.target, now) {
                    self.probe_soon(&p.target);
                }
            }
            let round = self.start_probe(now);
            self.next_probe = now.saturating_add(self.scale(round));
        }
        // Helpers whose target stayed silent say so.
        let mut nacks = Vec::new();
        for r in &mut self.relays {
            if !r.nacked && now >= r.nack_at {
                r.nacked = true;
                nacks.push((r.origin.clone(), r.origin_seq));
            }
        }
        for (origin, seq) in nacks {
            self.send(&origin, &Message::Nack { seq });
        }
        let (done, keep): (Vec<Relay>, Vec<Relay>) = self.relays.drain(..).partition(|r| now >= r.end);
        self.relays = keep;
        for r in done {
            if let Some(m) = self.members.get_mut(&r.origin) {
                m.relays = m.relays.saturating_sub(1);
            }
        }
        // Unrefuted suspicions become deaths; long-dead members are forgotten.
        let mut expired = Vec::new();
        let mut forgotten = Vec::new();
        for (name, m) in &self.members {
            if self.suspicion_deadline(m).is_some_and(|d| now >= d) {
                expired.push(name.clone());
            }
            if m.gone_at.is_some_and(|g| now >= g.saturating_add(self.config.dead_expiry)) {
                forgotten.push(name.clone());
            }
        }
        for name in expired {
            self.die(&name, now);
        }
        for name in forgotten {
            self.forget(&name);
        }
    }

    fn raise_health(&mut self, by: u32) {
        self.health = (self.health + by).min(self.config.max_local_health);
    }

    fn joins(&mut self, now: Timestamp) {
        if now < self.next_join {
            return;
        }
        self.next_join = now.saturating_add(self.config.join_retry);
        if self.live_members() == 0 {
            for (name, addr) in self.seeds.clone() {
                self.join(now, &name, Some(addr));
            }
        } else {
            // Anti-entropy: one live member's answer brings hints of members this node has not
            // heard of (answers to a join carry a sample, so in a big cluster one is not enough).
            let live: Vec<String> = self.live_targets().into_iter().map(|(n, _)| n).collect();
            let name = live[self.rng.below(live.len())].clone();
            self.join(now, &name, None);
        }
        // One member held dead or left: if it is back (restarted, or a partition healed) it
        // answers, even one whose only seed is itself.
        let mut dead: Vec<String> =
            self.members.values().filter(|m| m.state.is_gone()).map(|m| m.record.name.clone()).collect();
        if !dead.is_empty() {
            dead.sort_unstable();
            let name = dead.swap_remove(self.rng.below(dead.len()));
            self.join(now, &name, None);
        }
    }

    fn contact_hints(&mut self, now: Timestamp) {
        let mut due: Vec<(String, SocketAddr)> =
            self.hints.iter().filter(|(_, h)| now >= h.next_at).map(|(n, h)| (n.clone(), h.control)).collect();
        due.sort_unstable();
        for (name, addr) in due {
            let gone = match self.hints.get_mut(&name) {
                Some(h) => {
                    h.attempts += 1;
                    h.next_at = now.saturating_add(self.config.join_retry);
                    h.attempts > HINT_ATTEMPTS
                }
                None => continue,
            };
            if gone {
                self.hints.remove(&name);
            } else {
                self.join(now, &name, Some(addr));
            }
        }
    }

    /// The driver's fast signal: a peer could not be reached (connection lost, send failed).
    /// It is probed next rather than suspected: one broken path must not make a member look
    /// dead while others can still reach it.
    pub fn handle_unreachable(&mut self, name: &str) {
        self.probe_soon(name);
    }

    fn probe_soon(&mut self, name: &str) {
        let live = self.members.get(name).is_some_and(Member::live);
        let probing = self.probe.as_ref().is_some_and(|p| p.target == name);
        if live && !probing && !self.urgent.iter().any(|n| n == name) && self.urgent.len() < 64 {
            self.urgent.push_back(name.to_owned());
        }
    }

    /// Stops (or resumes) taking new flows; pinned flows stay. Announced to every peer.
    pub fn set_draining(&mut self, on: bool) {
        let state = if on { MemberState::Draining } else { MemberState::Alive };
        if self.me.state == state || self.me.state == MemberState::Left {
            return;
        }
        self.me.state = state;
        self.me.incarnation = self.me.incarnation.saturating_add(1);
        self.announce(Vec::new());
    }

    /// Claims (or gives up) the VIP's layer-2 ownership; peers learn it from the next load
    /// vector (see [`crate::entry`]).
    pub fn set_entry_claim(&mut self, on: bool) {
        self.entry_claim = on;
    }

    pub fn entry_claim(&self) -> bool {
        self.entry_claim
    }

    /// Says (in the next load vector) whether this node may be elected to own the VIP at
    /// layer 2: it runs the L2 entry and is ready.
    pub fn set_entry_candidate(&mut self, on: bool) {
        self.entry_candidate = on;
    }

    pub fn entry_candidate(&self) -> bool {
        self.entry_candidate
    }

    /// Says (in the next load vector) that this node's app fails its health checks, so that
    /// peers send it no new flows; its record, and so its incarnation, stay as they are.
    pub fn set_app_unhealthy(&mut self, on: bool) {
        self.app_unhealthy = on;
    }

    pub fn app_unhealthy(&self) -> bool {
        self.app_unhealthy
    }

    /// Replaces the seeds (a reload): asked when this node knows no live peer.
    pub fn set_seeds(&mut self, seeds: Vec<(String, SocketAddr)>) {
        let me = self.me.name.clone();
        self.seeds = seeds.into_iter().filter(|(n, _)| *n != me).collect();
    }

    /// Replaces the timers and bounds (a reload); they apply from the next probe round on.
    /// Members beyond a lowered `max_members` stay until they go; new ones are refused.
    pub fn set_config(&mut self, config: ClusterConfig) {
        self.config = config;
    }

    /// Changes this node's capacity weight (a reload), clamped like any member's; announced to
    /// every peer with a new incarnation.
    pub fn set_weight(&mut self, weight: f32) {
        let weight =
            if weight.is_finite() { weight.clamp(self.config.min_weight, self.config.max_weight) } else { 0.0 };
        if self.me.weight == weight || self.me.state == MemberState::Left {
            return;
        }
        self.me.weight = weight;
        self.me.incarnation = self.me.incarnation.saturating_add(1);
        self.announce(Vec::new());
    }

    /// Announces a graceful departure to every peer; the caller sends the transmits and stops.
    pub fn leave(&mut self) {
        self.me.state = MemberState::Left;
        self.me.incarnation = self.me.incarnation.saturating_add(1);
        self.announce(Vec::new());
    }

    /// Sends this node's load vector to every live peer.
    pub fn broadcast_load(&mut self, served_flows: u32, new_flows_per_sec: f32, cpu: f32) {
        let load = LoadVector {
            incarnation: self.me.incarnation,
            served_flows,
            new_flows_per_sec: if new_flows_per_sec.is_finite() { new_flows_per_sec.max(0.0) } else { 0.0 },
            cpu: if cpu.is_finite() { cpu.clamp(0.0, 1.0) } else { 0.0 },
            weight: self.me.weight,
            draining: self.me.state == MemberState::Draining,
            entry_claim: self.entry_claim,
            entry_candidate: self.entry_candidate,
            app_unhealthy: self.app_unhealthy,
        };
        let Ok(bytes) = encode(&Message::Load(load)) else { return };
        for (name, addr) in self.live_targets() {
            self.outbox.push_back(Transmit { to: name, addr, bytes: bytes.clone() });
        }
    }

    fn live_targets(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<_> =
            self.members.values().filter(|m| m.live()).map(|m| (m.record.name.clone(), m.record.control)).collect();
        v.sort_unstable();
        v
    }

    fn announce(&mut self, reports: Vec<Report>) {
        let msg = Message::Announce { sender: self.me.clone(), reports };
        let Ok(bytes) = encode(&msg) else { return };
        for (name, addr) in self.live_targets() {
            self.outbox.push_back(Transmit { to: name, addr, bytes: bytes.clone() });
        }
    }

    /// A datagram from the authenticated `from`.
    pub fn handle_datagram(&mut self, now: Timestamp, from: &Peer, bytes: &[u8]) -> Outcome {
        let outcome = self.handle(now, from, bytes);
        match outcome {
            Outcome::Accepted => {}
            Outcome::Refused(r) | Outcome::Close(r) => self.count(r),
        }
        self.contact_hints(now);
        outcome
    }

    fn handle(&mut self, now: Timestamp, from: &Peer, bytes: &[u8]) -> Outcome {
        let msg = match decode(bytes) {
            Ok(m) => m,
            Err(DecodeError::UnknownType(_)) => return Outcome::Refused(Refusal::UnknownType),
            Err(_) => return Outcome::Close(Refusal::Malformed),
        };
        if from.name == self.me.name {
            return Outcome::Close(Refusal::Identity);
        }
        match msg {
            Message::Ping { seq, sender, reports } => {
                if let Err(o) = self.hear(now, from, sender) {
                    return o;
                }
                let r = self.reports(now, from, reports);
                let reports = self.take_gossip();
                self.send(&from.name, &Message::Ack { seq, sender: self.me.clone(), reports });
                r
            }
            Message::Ack { seq, sender, reports } => {
                if let Err(o) = self.hear(now, from, sender) {
                    return o;
                }
                self.on_ack(now, seq, &from.name);
                self.reports(now, from, reports)
            }
            Message::Nack { seq } => {
                if !self.is_member(&from.name) {
                    return Outcome::Refused(Refusal::NotMember);
                }
                if let Some(p) = &mut self.probe {
                    if p.seq == seq && p.helpers.contains(&from.name) && !p.nacked.contains(&from.name) {
                        p.nacked.push(from.name.clone());
                    }
                }
                Outcome::Accepted
            }
            Message::PingReq { seq, target } => self.on_ping_req(now, &from.name, seq, target),
            Message::Join { sender } => {
                if let Err(o) = self.hear(now, from, sender) {
                    return o;
                }
                self.introduce(now, &from.name)
            }
            Message::Introduce { sender, hints } => {
                if let Err(o) = self.hear(now, from, sender) {
                    return o;
                }
                // Hints are taken only in answer to a Join this node sent to that peer, once:
                // nobody can push names on it unasked.
                let asked = self
                    .joined
                    .remove(&from.name)
                    .is_some_and(|at| now < at.saturating_add(self.config.join_retry * 5));
                if !asked {
                    return Outcome::Refused(Refusal::RateLimited);
                }
                self.on_hints(now, hints);
                Outcome::Accepted
            }
            Message::Announce { sender, reports } => {
                if let Err(o) = self.hear(now, from, sender) {
                    return o;
                }
                self.reports(now, from, reports)
            }
            Message::Load(load) => self.on_load(now, &from.name, load),
            // Only from live members; what they claim the data plane checks against its own
            // view (see `Node::apply`).
            Message::Flow(msg) => match self.members.get(&from.name) {
                Some(m) if m.live() => {
                    self.updates.push_back(Update::Flow { from: from.name.clone(), msg });
                    Outcome::Accepted
                }
                _ => Outcome::Refused(Refusal::NotMember),
            },
        }
    }

    /// Sends a flow-recovery message to the live member `to`; nothing to anyone else.
    pub fn send_flow(&mut self, to: &str, msg: FlowMessage) {
        if self.members.get(to).is_some_and(Member::live) {
            self.send(to, &Message::Flow(msg));
        }
    }

    fn is_member(&self, name: &str) -> bool {
        self.members.get(name).is_some_and(Member::live)
    }

    /// A member speaking for itself. `Err` carries the outcome when its record is refused.
    fn hear(&mut self, now: Timestamp, from: &Peer, mut rec: Record) -> Result<(), Outcome> {
        if rec.name != from.name {
            return Err(Outcome::Close(Refusal::Identity));
        }
        // One spelling per address (an IPv4-mapped IPv6 address is the IPv4 one), so that
        // uniqueness checks and the data plane see the same address whatever the claim said.
        rec.underlay = rec.underlay.to_canonical();
        rec.control = SocketAddr::new(rec.control.ip().to_canonical(), rec.control.port());
        let source = from.source.ip().to_canonical();
        let in_cert = |a: IpAddr| from.cert_addrs.iter().any(|c| c.to_canonical() == a.to_canonical());
        if !in_cert(rec.underlay) || !in_cert(rec.control.ip()) || source != rec.control.ip().to_canonical() {
            return Err(Outcome::Refused(Refusal::Address));
        }
        let clamped = rec.weight.clamp(self.config.min_weight, self.config.max_weight);
        if clamped != rec.weight {
            self.count(Refusal::WeightClamped);
            rec.weight = clamped;
        }
        let known = self.members.get(&rec.name).map(|m| (m.record.incarnation, m.state));
        match known {
            Some((inc, _)) if rec.incarnation < inc => return Ok(()), // reordered: older news
            Some((inc, state)) if rec.incarnation == inc => {
                // The same life. If this node holds it suspect or dead, tell it so that it
                // refutes (it may have been paused, or cut off, and believe all is well).
                if matches!(state, MemberState::Suspect | MemberState::Dead) {
                    self.notice(now, &rec.name);
                }
                return Ok(());
            }
            _ => {}
        }
        if known.is_none() && rec.state == MemberState::Left {
            return Ok(()); // a stranger's goodbye
        }
        if known.is_none() && self.members.len() + 2 > self.config.max_members {
            return Err(Outcome::Refused(Refusal::TableFull));
        }
        // Addresses are unique among members; a dead or left holder yields them.
        let holders: Vec<(String, bool)> = self
            .members
            .values()
            .filter(|m| m.record.name != rec.name)
            .filter(|m| m.record.underlay == rec.underlay || m.record.control == rec.control)
            .map(|m| (m.record.name.clone(), m.live()))
            .collect();
        let mine = self.me.underlay == rec.underlay || self.me.control == rec.control;
        if mine {
            return Err(Outcome::Refused(Refusal::AddressInUse));
        }
        if let Some((holder, _)) = holders.iter().find(|(_, live)| *live) {
            // If the holder is in fact gone, probing it finds out soon. A certificate for its
            // address in another's hands is the operator's word that it was replaced: it
            // counts as one confirmation of a suspicion, never as one by itself.
            let holder = holder.clone();
            self.probe_soon(&holder);
            let members = self.members.len();
            if let Some(h) = self.members.get_mut(&holder) {
                if !h.reporters.contains(&rec.name) && h.reporters.len() < members {
                    h.reporters.push(rec.name.clone());
                }
            }
            return Err(Outcome::Refused(Refusal::AddressInUse));
        }
        for (holder, _) in holders {
            self.forget(&holder);
        }
        self.hints.remove(&rec.name);
        let state = rec.state;
        let member = self.members.entry(rec.name.clone()).or_insert_with(|| Member {
            record: rec.clone(),
            state,
            suspicion: None,
            reporters: Vec::new(),
            gone_at: None,
            load: None,
            last_introduce: None,
            last_notice: None,
            relays: 0,
            rtt: None,
        });
        member.record = rec;
        member.state = state;
        member.suspicion = None;
        member.reporters.clear();
        member.gone_at = (state == MemberState::Left).then_some(now);
        if state == MemberState::Left {
            member.load = None;
        }
        let update = member_update(member);
        self.updates.push_back(update);
        Ok(())
    }

    /// Tells a member this node holds it suspect or dead, at most once per probe interval.
    fn notice(&mut self, now: Timestamp, name: &str) {
        let interval = self.config.probe_interval;
        let Some(m) = self.members.get_mut(name) else { return };
        if m.last_notice.is_some_and(|t| now < t.saturating_add(interval)) {
            return;
        }
        m.last_notice = Some(now);
        let kind = if m.state == MemberState::Dead { ReportKind::Dead } else { ReportKind::Suspect };
        let report = Report { name: name.to_owned(), incarnation: m.record.incarnation, kind };
        self.send(name, &Message::Announce { sender: self.me.clone(), reports: vec![report] });
    }

    fn reports(&mut self, now: Timestamp, from: &Peer, reports: Vec<Report>) -> Outcome {
        // The first refusal is the message's outcome (counted by the caller); any further
        // ones are counted here.
        let mut outcome = Outcome::Accepted;
        for r in reports {
            if let Err(refusal) = self.report(now, &from.name, &r) {
                if outcome == Outcome::Accepted {
                    outcome = Outcome::Refused(refusal);
                } else {
                    self.count(refusal);
                }
            }
        }
        outcome
    }

    /// `from` says `r.name` did not answer it.
    fn report(&mut self, now: Timestamp, from: &str, r: &Report) -> Result<(), Refusal> {
        if r.name == self.me.name {
            if self.me.state == MemberState::Left {
                return Ok(());
            }
            if r.incarnation > self.me.incarnation {
                return Err(Refusal::Incarnation);
            }
            if r.incarnation == self.me.incarnation {
                self.refute(now);
            }
            return Ok(());
        }
        if r.name == from {
            return Ok(());
        }
        let members = self.members.len();
        let Some(m) = self.members.get_mut(&r.name) else { return Err(Refusal::NotMember) };
        if r.incarnation > m.record.incarnation {
            return Err(Refusal::Incarnation);
        }
        if r.incarnation < m.record.incarnation || !m.live() {
            return Ok(()); // older news, or nothing left to suspect
        }
        if !m.reporters.iter().any(|n| n == from) && m.reporters.len() < members {
            m.reporters.push(from.to_owned());
        }
        if m.suspicion.is_none() {
            let name = r.name.clone();
            self.probe_soon(&name);
        }
        Ok(())
    }

    /// Someone suspects this node at its current incarnation: it is alive, so it says so.
    fn refute(&mut self, now: Timestamp) {
        // One refutation per probe interval: the last one's announcement is still on its way,
        // and a peer that keeps reporting cannot make this node flood the cluster. Unlike
        // Lifeguard, a refutation does not raise local health: a report is another's claim,
        // and health must move only on what this node observes itself (late timers, missing
        // nacks), or one member's reports could slow every other node's detection.
        if self.last_refutation.is_some_and(|t| now < t.saturating_add(self.config.probe_interval)) {
            return;
        }
        self.last_refutation = Some(now);
        self.me.incarnation = self.me.incarnation.saturating_add(1);
        self.stats.refuted += 1;
        self.announce(Vec::new());
    }

    fn on_ack(&mut self, now: Timestamp, seq: u64, from: &str) {
        if let Some(p) = &self.probe {
            if p.seq == seq && (p.target == from || p.helpers.iter().any(|h| h == from)) {
                // Only a direct answer times the path to the target (an indirect one also
                // times the helper's), and only while this node is not starved itself (its
                // own lateness would count against the target).
                if p.target == from && !(p.indirect_sent && p.helpers.is_empty()) && self.health == 0 {
                    let sample = now.saturating_since(p.started);
                    if let Some(m) = self.members.get_mut(from) {
                        match &mut m.rtt {
                            Some(r) => r.update(sample),
                            None => m.rtt = Some(RttEstimate::first(sample)),
                        }
                    }
                }
                self.probe = None;
                self.health = self.health.saturating_sub(1);
                return;
            }
        }
        if let Some(i) = self.relays.iter().position(|r| r.seq == seq && r.target == from) {
            let r = self.relays.swap_remove(i);
            if let Some(m) = self.members.get_mut(&r.origin) {
                m.relays = m.relays.saturating_sub(1);
            }
            if !r.nacked {
                self.send(&r.origin, &Message::Ack { seq: r.origin_seq, sender: self.me.clone(), reports: Vec::new() });
            }
        }
    }

    fn on_ping_req(&mut self, now: Timestamp, from: &str, seq: u64, target: String) -> Outcome {
        if !self.is_member(from) || !self.is_member(&target) || target == from {
            return Outcome::Refused(Refusal::NotMember);
        }
        let Some(origin) = self.members.get_mut(from) else { return Outcome::Refused(Refusal::NotMember) };
        if origin.relays >= MAX_RELAYS_PER_PEER {
            return Outcome::Refused(Refusal::RateLimited);
        }
        origin.relays += 1;
        let my_seq = self.seq();
        // The asker's round ends about a probe interval after it asked: a nack or an ack
        // later than that is of no use to it (and a starved helper must not hoard relays).
        self.relays.push(Relay {
            seq: my_seq,
            target: target.clone(),
            origin: from.to_owned(),
            origin_seq: seq,
            nack_at: now.saturating_add(self.probe_timeout_for(&target).mul_f64(0.8)),
            nacked: false,
            end: now.saturating_add(self.round_for(&target)),
        });
        let reports = self.take_gossip();
        self.send(&target, &Message::Ping { seq: my_seq, sender: self.me.clone(), reports });
        Outcome::Accepted
    }

    fn introduce(&mut self, now: Timestamp, to: &str) -> Outcome {
        let gap = self.config.join_retry / 2;
        let Some(m) = self.members.get_mut(to) else { return Outcome::Accepted };
        if m.last_introduce.is_some_and(|t| now < t.saturating_add(gap)) {
            return Outcome::Refused(Refusal::RateLimited);
        }
        m.last_introduce = Some(now);
        let mut all: Vec<Hint> = self
            .members
            .values()
            .filter(|m| m.live() && m.record.name != to)
            .map(|m| Hint { name: m.record.name.clone(), control: m.record.control })
            .collect();
        all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        // A sample when there are more than fit: repeated joins learn the rest.
        let mut hints = Vec::new();
        while hints.len() < HINTS_PER_REPLY && !all.is_empty() {
            let i = self.rng.below(all.len());
            hints.push(all.swap_remove(i));
        }
        let mut msg = Message::Introduce { sender: self.me.clone(), hints };
        while encode(&msg).is_err() {
            match &mut msg {
                Message::Introduce { hints, .. } if !hints.is_empty() => {
                    hints.pop();
                }
                _ => return Outcome::Accepted,
            }
        }
        self.send(to, &msg);
        Outcome::Accepted
    }

    fn on_hints(&mut self, now: Timestamp, hints: Vec<Hint>) {
        for h in hints {
            if h.name == self.me.name || self.members.contains_key(&h.name) || self.hints.contains_key(&h.name) {
                continue;
            }
            if self.hints.len() >= MAX_HINTS || self.members.len() + self.hints.len() + 1 >= self.config.max_members {
                self.count(Refusal::TableFull);
                break;
            }
            self.hints.insert(h.name, PendingHint { control: h.control, attempts: 0, next_at: now });
        }
    }

    fn on_load(&mut self, now: Timestamp, from: &str, mut load: LoadVector) -> Outcome {
        let (min_w, max_w) = (self.config.min_weight, self.config.max_weight);
        let Some(m) = self.members.get_mut(from) else { return Outcome::Refused(Refusal::NotMember) };
        if !m.live() {
            return Outcome::Refused(Refusal::NotMember);
        }
        if load.incarnation != m.record.incarnation {
            return Outcome::Accepted; // ahead of or behind its record: wait for the record
        }
        let plausible = (0.0..=1.0).contains(&load.cpu) && (0.0..=MAX_PLAUSIBLE_RATE).contains(&load.new_flows_per_sec);
        if !plausible {
            return Outcome::Refused(Refusal::ImplausibleLoad);
        }
        let clamped = load.weight.clamp(min_w, max_w);
        let was_clamped = clamped != load.weight;
        load.weight = clamped;
        m.load = Some((load, now));
        m.record.weight = clamped;
        self.updates.push_back(Update::Load { name: from.to_owned(), load });
        if was_clamped {
            return Outcome::Refused(Refusal::WeightClamped);
        }
        Outcome::Accepted
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Sends this node's `Join` to `to`, remembering when: only an answer to it may bring hints.
    fn join(&mut self, now: Timestamp, to: &str, addr: Option<SocketAddr>) {
        if self.joined.len() < MAX_HINTS * 2 || self.joined.contains_key(to) {
            self.joined.insert(to.to_owned(), now);
        }
        let msg = Message::Join { sender: self.me.clone() };
        match addr {
            Some(addr) => self.send_to(to, addr, &msg),
            None => self.send(to, &msg),
        }
    }

    fn send(&mut self, to: &str, msg: &Message) {
        let addr = match self.members.get(to) {
            Some(m) => m.record.control,
            None => match self.seeds.iter().find(|(n, _)| n == to) {
                Some((_, a)) => *a,
                None => return,
            },
        };
        self.send_to(to, addr, msg);
    }

    fn send_to(&mut self, to: &str, addr: SocketAddr, msg: &Message) {
        let mut msg = std::borrow::Cow::Borrowed(msg);
        loop {
            match encode(&msg) {
                Ok(bytes) => return self.outbox.push_back(Transmit { to: to.to_owned(), addr, bytes }),
                // Too many reports beside a long record: drop the last until it fits.
                Err(message::EncodeError::TooLong) => match msg.to_mut() {
                    Message::Ping { reports, .. }
                    | Message::Ack { reports, .. }
                    | Message::Announce { reports, .. }
                        if !reports.is_empty() =>
                    {
                        reports.pop();
                    }
                    _ => return debug_assert!(false, "unencodable message {msg:?}"),
                },
                // Only this node's own records go out; they were valid when made.
                Err(_) => return debug_assert!(false, "unencodable message {msg:?}"),
            }
        }
    }

    /// Up to `k` members to probe `target` for: this node's own site first (near, so their
    /// answers and nacks come back in time; across a cut WAN they still nack, and this node
    /// does not take the cut for its own slowness), then members of other sites.
    fn helpers_for(&mut self, k: usize, target: &str) -> Vec<String> {
        let mut out = self.random_live_members_where(k, target, true);
        if out.len() < k {
            out.extend(self.random_live_members_where(k - out.len(), target, false));
        }
        out
    }

    fn random_live_members_where(&mut self, k: usize, except: &str, own_site: bool) -> Vec<String> {
        let mut c: Vec<String> = self
            .members
            .values()
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Draining) && m.record.name != except)
            .filter(|m| (m.record.site == self.me.site) == own_site)
            .map(|m| m.record.name.clone())
            .collect();
        c.sort_unstable(); // hash-map order must not leak into the seeded choice
        let mut out = Vec::with_capacity(k);
        while out.len() < k && !c.is_empty() {
            let i = self.rng.below(c.len());
            out.push(c.swap_remove(i));
        }
        out
    }

    /// Probes the next member; returns how long its round lasts (unscaled).
    fn start_probe(&mut self, now: Timestamp) -> Duration {
        let name = loop {
            if let Some(n) = self.urgent.pop_front() {
                self.probe_order.retain(|o| *o != n);
                break n;
            }
            if let Some(n) = self.probe_order.pop() {
                break n;
            }
            let mut order: Vec<String> =
                self.members.values().filter(|m| m.live()).map(|m| m.record.name.clone()).collect();
            if order.is_empty() {
                return self.config.probe_interval;
            }
            order.sort_unstable();
            for i in (1..order.len()).rev() {
                let j = self.rng.below(i + 1);
                order.swap(i, j);
            }
            self.probe_order = order;
        };
        if !self.members.get(&name).is_some_and(Member::live) {
            return self.start_probe(now);
        }
        let seq = self.seq();
        self.ping(&name, seq);
        let round = self.round_for(&name);
        self.probe = Some(Probe {
            timeout: self.scale(self.probe_timeout_for(&name)),
            target: name,
            seq,
            started: now,
            helpers: Vec::new(),
            nacked: Vec::new(),
            indirect_sent: false,
        });
        round
    }

    /// Sends `name` a ping with the gossip due and, if it is suspect, the notice it must refute.
    fn ping(&mut self, name: &str, seq: u64) {
        let mut reports = self.take_gossip();
        if let Some(m) = self.members.get(name).filter(|m| m.state == MemberState::Suspect) {
            if !reports.iter().any(|r| r.name == name) {
                let notice =
                    Report { name: name.to_owned(), incarnation: m.record.incarnation, kind: ReportKind::Suspect };
                reports.truncate(message::MAX_ITEMS - 1);
                reports.push(notice);
            }
        }
        self.send(name, &Message::Ping { seq, sender: self.me.clone(), reports });
    }

    /// Makes a member suspect; whether it was not already.
    fn suspect(&mut self, name: &str, now: Timestamp) -> bool {
        let Some(m) = self.members.get_mut(name) else { return false };
        if !matches!(m.state, MemberState::Alive | MemberState::Draining) {
            return false;
        }
        m.state = MemberState::Suspect;
        m.suspicion = Some(Suspicion { since: now });
        let report = Report { name: name.to_owned(), incarnation: m.record.incarnation, kind: ReportKind::Suspect };
        let update = member_update(m);
        self.updates.push_back(update);
        self.stats.suspected += 1;
        self.enqueue_gossip(report);
        self.notice(now, name);
        true
    }

    fn die(&mut self, name: &str, now: Timestamp) {
        let Some(m) = self.members.get_mut(name) else { return };
        m.state = MemberState::Dead;
        m.suspicion = None;
        m.gone_at = Some(now);
        m.load = None;
        let report = Report { name: name.to_owned(), incarnation: m.record.incarnation, kind: ReportKind::Dead };
        let update = member_update(m);
        self.updates.push_back(update);
        self.stats.died += 1;
        self.enqueue_gossip(report);
    }

    fn forget(&mut self, name: &str) {
        if self.members.remove(name).is_some() {
            self.probe_order.retain(|n| n != name);
            self.urgent.retain(|n| n != name);
            self.gossip.retain(|(r, _)| r.name != name);
            self.updates.push_back(Update::Removed { name: name.to_owned() });
        }
    }

    fn enqueue_gossip(&mut self, r: Report) {
        let n = self.retransmits();
        self.gossip.retain(|(g, _)| g.name != r.name);
        self.gossip.push((r, n));
    }

    /// The reports sent fewest times so far that fit beside a record in one message.
    fn take_gossip(&mut self) -> Vec<Report> {
        self.gossip.sort_by_key(|(_, left)| std::cmp::Reverse(*left));
        // A record takes at most ~130 bytes; the rest is for reports.
        let mut room = MAX_MESSAGE - 160;
        let mut out = Vec::new();
        for (r, left) in &mut self.gossip {
            let len = message::encoded_report_len(r);
            if len > room || out.len() == message::MAX_ITEMS {
                break;
            }
            room -= len;
            out.push(r.clone());
            *left -= 1;
        }
        self.gossip.retain(|(_, left)| *left > 0);
        out
    }
}

fn member_update(m: &Member) -> Update {
    Update::Member {
        name: m.record.name.clone(),
        underlay: m.record.underlay,
        weight: f64::from(m.record.weight),
        state: m.state,
        site: m.record.site.clone(),
    }
}

/// The fingerprint of this build's flow hash: the stable hash of a fixed flow. Nodes that
/// disagree on it place hash-fallback flows differently (see [`Identity::flow_hash`]).
pub fn flow_hash_fingerprint() -> u64 {
    use std::net::Ipv4Addr;
    let key = ringlb_wire::FlowKey::new(
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
        40_000,
        443,
        ringlb_wire::IPPROTO_TCP,
    );
    key.stable_hash()
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Sans-IO: time comes in.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Timestamp,
}

impl RateLimit {
    pub fn new(rate: f64, burst: f64, now: Timestamp) -> Self {
        RateLimit { rate, burst, tokens: burst, last: now }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Timestamp) -> bool {
        let dt = now.saturating_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
