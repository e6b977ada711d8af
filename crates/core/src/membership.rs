//! Membership and failure detection: SWIM with indirect probes, suspicion and refutation.
//!
//! Every `probe_interval` a node pings one member, taken in a shuffled round-robin order so
//! that each member is probed within two rounds. No ack within `probe_timeout`: it asks
//! `indirect_probes` other members to ping the target for it (a cut path does not make a
//! member look dead while others can reach it). Still no ack by the end of the round: the
//! target becomes *suspect*; new flows stop going to it at once, but it is declared *dead*
//! only if nobody has heard it refute the suspicion within `suspicion_timeout`, so a node
//! that is merely slow (CPU load) is not thrown out. Refutation: a node that hears itself
//! suspected raises its incarnation and gossips that it is alive.
//!
//! Updates travel piggybacked on pings and acks, each sent a few times log(N) times, so the
//! cost per node stays constant as the cluster grows. The driver may also report that a peer
//! is unreachable (connection lost, send failed): that peer is probed next.
//!
//! Coming back: once a second a node sends a `Join` to one member it holds dead; a member that
//! is back answers and rejoins, even one with no seeds of its own. A member that talks to a node
//! holding it suspect or dead is told so, and refutes.
//!
//! Sans-IO: messages in through [`Membership::handle`], out through [`Membership::poll_transmit`],
//! time through `now` arguments and [`Membership::poll_timeout`].

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hashbrown::HashMap;
use ringlb_wire::control::{update_len, MemberUpdate, Message, UpdateState, MAX_MESSAGE};

use crate::{Rng, Timestamp};

/// Tuning of failure detection.
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipConfig {
    pub probe_interval: Duration,
    /// Wait for a direct ack before asking others to probe.
    pub probe_timeout: Duration,
    pub indirect_probes: usize,
    /// How long a suspicion may go unrefuted before the member is declared dead; scaled up
    /// by log10 of the cluster size, as gossip takes longer to reach everyone.
    pub suspicion_timeout: Duration,
    /// Each update is piggybacked `retransmit_mult * ceil(log2(N + 1))` times.
    pub retransmit_mult: u32,
    /// How often a node that knows no live peer asks its seeds again.
    pub join_retry: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(80),
            indirect_probes: 3,
            suspicion_timeout: Duration::from_millis(2000),
            retransmit_mult: 4,
            join_retry: Duration::from_secs(1),
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
}

/// A message to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    pub to_name: String,
    pub to_addr: SocketAddr,
    pub msg: Message,
}

/// What changed, for the driver to apply to the data plane.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    /// A member was learned or changed state (or addresses); carries the latest update.
    Member(MemberUpdate),
}

#[derive(Debug, Clone)]
struct Peer {
    update: MemberUpdate,
    /// When a suspicion turns into death.
    suspect_deadline: Option<Timestamp>,
}

#[derive(Debug, Clone)]
struct Probe {
    target: String,
    seq: u64,
    started: Timestamp,
    indirect_sent: bool,
}

#[derive(Debug, Clone)]
struct Relay {
    /// Seq of our ping to the target.
    seq: u64,
    origin: String,
    origin_seq: u64,
    deadline: Timestamp,
}

/// One node's membership state machine. See the module documentation.
#[derive(Debug)]
pub struct Membership {
    config: MembershipConfig,
    me: MemberUpdate,
    peers: HashMap<String, Peer, foldhash::fast::FixedState>,
    seeds: Vec<(String, SocketAddr)>,
    rng: Rng,
    next_seq: u64,
    probe: Option<Probe>,
    probe_order: Vec<String>,
    next_probe: Timestamp,
    next_join: Timestamp,
    relays: Vec<Relay>,
    gossip: Vec<(MemberUpdate, u32)>,
    outbox: VecDeque<Transmit>,
    events: VecDeque<MembershipEvent>,
}

impl Membership {
    /// `incarnation` must exceed any this node used before (e.g. wall-clock milliseconds), so
    /// that a restarted node overrides what the cluster remembers of its previous life.
    pub fn new(
        identity: Identity,
        incarnation: u64,
        seeds: Vec<(String, SocketAddr)>,
        config: MembershipConfig,
        seed: u64,
        now: Timestamp,
    ) -> Self {
        let me = MemberUpdate {
            name: identity.name,
            incarnation,
            state: UpdateState::Alive,
            underlay: identity.underlay,
            control: identity.control,
            weight: identity.weight,
        };
        let seeds = seeds.into_iter().filter(|(n, _)| *n != me.name).collect();
        Membership {
            config,
            me,
            peers: HashMap::with_hasher(foldhash::fast::FixedState::with_seed(seed)),
            seeds,
            rng: Rng::seed(seed),
            next_seq: 1,
            probe: None,
            probe_order: Vec::new(),
            next_probe: now,
            next_join: now,
            relays: Vec::new(),
            gossip: Vec::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.me.name
    }

    pub fn incarnation(&self) -> u64 {
        self.me.incarnation
    }

    /// This node's own record.
    pub fn local(&self) -> &MemberUpdate {
        &self.me
    }

    /// What this node believes about a peer.
    pub fn peer(&self, name: &str) -> Option<&MemberUpdate> {
        self.peers.get(name).map(|p| &p.update)
    }

    pub fn peers(&self) -> impl Iterator<Item = &MemberUpdate> {
        self.peers.values().map(|p| &p.update)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    fn live_peers(&self) -> usize {
        self.peers.values().filter(|p| matches!(p.update.state, UpdateState::Alive | UpdateState::Suspect)).count()
    }

    fn retransmits(&self) -> u32 {
        let n = u32::try_from(self.peers.len() + 1).unwrap_or(u32::MAX);
        self.config.retransmit_mult * (u32::BITS - n.leading_zeros()).max(1)
    }

    fn suspicion_timeout(&self) -> Duration {
        let n = (self.peers.len() + 1) as f64;
        self.config.suspicion_timeout.mul_f64(n.log10().max(1.0))
    }

    /// When [`Membership::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut t = self.next_probe;
        if let Some(p) = &self.probe {
            if !p.indirect_sent {
                t = t.min(p.started.saturating_add(self.config.probe_timeout));
            }
        }
        let dead = self.peers.values().any(|p| p.update.state == UpdateState::Dead);
        if (self.live_peers() == 0 && !self.seeds.is_empty()) || dead {
            t = t.min(self.next_join);
        }
        for p in self.peers.values() {
            if let Some(d) = p.suspect_deadline {
                t = t.min(d);
            }
        }
        for r in &self.relays {
            t = t.min(r.deadline);
        }
        Some(t)
    }

    pub fn handle_timeout(&mut self, now: Timestamp) {
        if now >= self.next_join {
            self.next_join = now.saturating_add(self.config.join_retry);
            // Join (again) while no peer is known alive.
            if self.live_peers() == 0 {
                for (name, addr) in self.seeds.clone() {
                    self.outbox.push_back(Transmit {
                        to_name: name,
                        to_addr: addr,
                        msg: Message::Join { gossip: vec![self.me.clone()] },
                    });
                }
            }
            // Reach out to one member held dead: if it is back (restarted, or the partition
            // healed) it answers with its news and rejoins, even when it has no seeds itself.
            let mut dead: Vec<String> = self
                .peers
                .values()
                .filter(|p| p.update.state == UpdateState::Dead)
                .map(|p| p.update.name.clone())
                .collect();
            if !dead.is_empty() {
                dead.sort_unstable();
                let name = dead.swap_remove(self.rng.below(dead.len()));
                self.send(&name, Message::Join { gossip: vec![self.me.clone()] });
            }
        }
        // Direct probe unanswered: ask others.
        if let Some(p) = &mut self.probe {
            if !p.indirect_sent && now >= p.started.saturating_add(self.config.probe_timeout) {
                p.indirect_sent = true;
                let (target, seq) = (p.target.clone(), p.seq);
                let helpers = self.random_live_peers(self.config.indirect_probes, &target);
                for h in helpers {
                    self.send(&h, Message::PingReq { seq, target: target.clone() });
                }
            }
        }
        // End of the protocol round: an unanswered probe makes its target suspect.
        if now >= self.next_probe {
            if let Some(p) = self.probe.take() {
                self.suspect(&p.target, now);
            }
            self.start_probe(now);
            self.next_probe = now.saturating_add(self.config.probe_interval);
        }
        // Unrefuted suspicions become deaths.
        let expired: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.suspect_deadline.is_some_and(|d| now >= d))
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            if let Some(p) = self.peers.get(&name) {
                let mut u = p.update.clone();
                u.state = UpdateState::Dead;
                self.apply(u, now);
            }
        }
        self.relays.retain(|r| r.deadline > now);
    }

    /// The driver's fast signal: a peer could not be reached (connection lost, send failed).
    ///
    /// It is probed next rather than suspected at once: one broken path must not make a member
    /// look dead while others can still reach it, and the probe's indirect round settles that
    /// within one protocol period.
    pub fn report_unreachable(&mut self, name: &str, _now: Timestamp) {
        if self.probe.as_ref().is_some_and(|p| p.target == name) || !self.peers.contains_key(name) {
            return;
        }
        self.probe_order.retain(|n| n != name);
        self.probe_order.push(name.to_owned());
    }

    /// Announces a graceful departure to every peer; the caller sends the transmits and stops.
    pub fn leave(&mut self) {
        self.me.incarnation = self.me.incarnation.saturating_add(1);
        self.me.state = UpdateState::Left;
        let names: Vec<String> = self
            .peers
            .values()
            .filter(|p| matches!(p.update.state, UpdateState::Alive | UpdateState::Suspect))
            .map(|p| p.update.name.clone())
            .collect();
        for n in names {
            self.send(&n, Message::Members { gossip: vec![self.me.clone()] });
        }
    }

    /// A message from the authenticated peer `from`.
    pub fn handle(&mut self, now: Timestamp, from: &str, msg: Message) {
        // A member we hold suspect or dead is talking to us: tell it, so that it refutes (it
        // may have been paused, or cut off, and believe all is well).
        if let Some(p) = self.peers.get(from) {
            if matches!(p.update.state, UpdateState::Suspect | UpdateState::Dead) {
                let record = p.update.clone();
                self.send(from, Message::Members { gossip: vec![record] });
            }
        }
        match msg {
            Message::Ping { seq, gossip } => {
                self.apply_all(gossip, now, from);
                let gossip = self.take_gossip(9 + 2);
                self.send(from, Message::Ack { seq, gossip });
            }
            Message::Ack { seq, gossip } => {
                self.apply_all(gossip, now, from);
                if self.probe.as_ref().is_some_and(|p| p.seq == seq) {
                    self.probe = None;
                }
                if let Some(i) = self.relays.iter().position(|r| r.seq == seq) {
                    let r = self.relays.swap_remove(i);
                    self.send(&r.origin, Message::Ack { seq: r.origin_seq, gossip: Vec::new() });
                }
            }
            Message::PingReq { seq, target } => {
                if self.peers.contains_key(&target) {
                    let my_seq = self.seq();
                    self.relays.push(Relay {
                        seq: my_seq,
                        origin: from.to_owned(),
                        origin_seq: seq,
                        deadline: now.saturating_add(self.config.probe_interval),
                    });
                    let gossip = self.take_gossip(9 + 2);
                    self.send(&target, Message::Ping { seq: my_seq, gossip });
                }
            }
            Message::Join { gossip } => {
                self.apply_all(gossip, now, from);
                // Answer with everything known, in as many messages as it takes.
                let mut all: Vec<MemberUpdate> = self.peers.values().map(|p| p.update.clone()).collect();
                all.push(self.me.clone());
                for chunk in pack(all, 3) {
                    self.send(from, Message::Members { gossip: chunk });
                }
            }
            Message::Members { gossip } => self.apply_all(gossip, now, from),
            Message::Load(_) => {} // the driver routes load vectors to the data plane
        }
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn send(&mut self, to: &str, msg: Message) {
        let addr = match self.peers.get(to) {
            Some(p) => p.update.control,
            None => match self.seeds.iter().find(|(n, _)| n == to) {
                Some((_, a)) => *a,
                None => return,
            },
        };
        self.outbox.push_back(Transmit { to_name: to.to_owned(), to_addr: addr, msg });
    }

    fn random_live_peers(&mut self, k: usize, except: &str) -> Vec<String> {
        let mut c: Vec<String> = self
            .peers
            .values()
            .filter(|p| p.update.state == UpdateState::Alive && p.update.name != except)
            .map(|p| p.update.name.clone())
            .collect();
        c.sort_unstable(); // HashMap order must not leak into the seeded choice
        let mut out = Vec::with_capacity(k);
        while out.len() < k && !c.is_empty() {
            let i = self.rng.below(c.len());
            out.push(c.swap_remove(i));
        }
        out
    }

    fn start_probe(&mut self, now: Timestamp) {
        loop {
            let Some(name) = self.probe_order.pop() else {
                let mut order: Vec<String> = self
                    .peers
                    .values()
                    .filter(|p| matches!(p.update.state, UpdateState::Alive | UpdateState::Suspect))
                    .map(|p| p.update.name.clone())
                    .collect();
                if order.is_empty() {
                    return;
                }
                order.sort_unstable();
                for i in (1..order.len()).rev() {
                    let j = self.rng.below(i + 1);
                    order.swap(i, j);
                }
                self.probe_order = order;
                continue;
            };
            let probe_it = self
                .peers
                .get(&name)
                .is_some_and(|p| matches!(p.update.state, UpdateState::Alive | UpdateState::Suspect));
            if probe_it {
                let seq = self.seq();
                let gossip = self.take_gossip(9 + 2);
                self.send(&name, Message::Ping { seq, gossip });
                self.probe = Some(Probe { target: name, seq, started: now, indirect_sent: false });
                return;
            }
        }
    }

    fn suspect(&mut self, name: &str, now: Timestamp) {
        if let Some(p) = self.peers.get(name) {
            if p.update.state == UpdateState::Alive {
                let mut u = p.update.clone();
                u.state = UpdateState::Suspect;
                self.apply(u, now);
            }
        }
    }

    fn apply_all(&mut self, updates: Vec<MemberUpdate>, now: Timestamp, from: &str) {
        for mut u in updates {
            // Where a member lives is its own word: others may spread its state, but a change of
            // its addresses is taken only from the member itself.
            if u.name != from {
                if let Some(p) = self.peers.get(&u.name) {
                    u.underlay = p.update.underlay;
                    u.control = p.update.control;
                }
            }
            self.apply(u, now);
        }
    }

    /// SWIM's precedence: a higher incarnation wins; at equal incarnation Dead/Left beat
    /// Suspect, which beats Alive.
    fn apply(&mut self, u: MemberUpdate, now: Timestamp) {
        if u.name == self.me.name {
            if matches!(u.state, UpdateState::Suspect | UpdateState::Dead)
                && u.incarnation >= self.me.incarnation
                && self.me.state == UpdateState::Alive
            {
                // Refute: we are alive, at a newer incarnation.
                self.me.incarnation = u.incarnation.saturating_add(1);
                let me = self.me.clone();
                self.enqueue_gossip(me);
            }
            return;
        }
        let rank = |s: UpdateState| match s {
            UpdateState::Alive => 0,
            UpdateState::Suspect => 1,
            UpdateState::Dead | UpdateState::Left => 2,
        };
        let accept = match self.peers.get(&u.name) {
            None => true,
            Some(p) => {
                let cur = &p.update;
                u.incarnation > cur.incarnation || (u.incarnation == cur.incarnation && rank(u.state) > rank(cur.state))
            }
        };
        if !accept {
            return;
        }
        let suspect_deadline = (u.state == UpdateState::Suspect).then(|| now.saturating_add(self.suspicion_timeout()));
        let changed = self.peers.get(&u.name).is_none_or(|p| p.update != u);
        self.peers.insert(u.name.clone(), Peer { update: u.clone(), suspect_deadline });
        if changed {
            self.events.push_back(MembershipEvent::Member(u.clone()));
        }
        self.enqueue_gossip(u);
    }

    fn enqueue_gossip(&mut self, u: MemberUpdate) {
        let n = self.retransmits();
        self.gossip.retain(|(g, _)| g.name != u.name);
        self.gossip.push((u, n));
    }

    /// Picks the updates sent fewest times so far that fit in a message with `overhead` bytes
    /// of its own.
    fn take_gossip(&mut self, overhead: usize) -> Vec<MemberUpdate> {
        self.gossip.sort_by_key(|(_, left)| std::cmp::Reverse(*left));
        let mut room = MAX_MESSAGE - overhead;
        let mut out = Vec::new();
        for (u, left) in &mut self.gossip {
            let len = update_len(u);
            if len > room || out.len() == usize::from(u8::MAX) {
                break;
            }
            room -= len;
            out.push(u.clone());
            *left -= 1;
        }
        self.gossip.retain(|(_, left)| *left > 0);
        out
    }
}

/// Splits updates into groups that each fit one message with `overhead` bytes of its own.
fn pack(updates: Vec<MemberUpdate>, overhead: usize) -> Vec<Vec<MemberUpdate>> {
    let mut out = vec![Vec::new()];
    let mut room = MAX_MESSAGE - overhead;
    for u in updates {
        let len = update_len(&u);
        if len > room || out.last().is_some_and(|v| v.len() == usize::from(u8::MAX)) {
            out.push(Vec::new());
            room = MAX_MESSAGE - overhead;
        }
        room -= len;
        if let Some(last) = out.last_mut() {
            last.push(u);
        }
    }
    out
}
