//! Flow recovery: any entry finds the server of any connection, whoever placed it.
//!
//! An entry that does not know a connection (its daemon restarted, or the router moved the
//! connection to it from another entry) sends its packets to the flow's *home*: the member
//! consistent hashing names for it, which every node computes alike. Every server tells each
//! of its connections' homes "I serve this" ([`FlowMessage::Serves`]) once the connection is
//! established, again every `refresh`, at once when the set of homes changes, and when a home
//! asks ([`FlowMessage::Sync`], sent by a daemon that starts). The home keeps those claims in
//! its [`Directory`]; for a packet of a connection it does not serve it looks the server up,
//! passes the packet on (the second hop) and teaches the entry ([`FlowMessage::Teach`]), which
//! from then on sends the connection's packets straight to its server.
//!
//! - A flow the entry knows costs nothing: no lookup, no extra hop.
//! - A flow it does not know costs one extra hop until the teaching arrives (about one round
//!   trip), and a home with no claim for it while the directory settles (just after a start or
//!   a change of homes) drops the packet rather than let a kernel answer RST: the client sends
//!   it again. Once settled, a flow nobody claims is handed to the kernel as before.
//! - Correct when entries and servers change at once: claims come from the servers, which
//!   learn their connections from their own kernels (see [`Node::adopt_local_flow`]), not
//!   from the entries that placed them.
//!
//! Trust: a claim names the member that sent it (no message can claim for another), is about a
//! TCP connection to the VIP, and counts against that member's quota; a fresh claim is not
//! taken over by another member's. An entry accepts "served by S" only from the node it sent
//! the connection to, and only naming a live member. A compromised member can thus claim
//! connections it does not serve for entries that lost them (and receive their packets), as it
//! could be placed new connections anyway; it cannot move connections any entry knows.
//!
//! UDP flows are not recovered: an entry places an unknown datagram as a new flow.

use std::time::Duration;

use ringlb_wire::{FlowKey, PacketMeta};

use super::{Node, Verdict};
use crate::cluster::{ClientFlow, FlowMessage, MAX_FLOWS};
use crate::directory::{ClaimRefused, Directory};
use crate::placement::{consistent_hash, Placement};
use crate::{DropReason, MemberState, NodeId, Timestamp};

/// Timers of flow recovery.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// How often a server tells the homes of its connections again.
    pub refresh: Duration,
    /// A claim not repeated for this long lapses; a few refreshes, so one lost message is no
    /// loss.
    pub ttl: Duration,
    /// After its start or a change of homes, a node's directory may lack claims for this long
    /// (servers answer a sync request, or tell the new homes, within a round trip or two once
    /// they see the change too).
    pub settle: Duration,
    /// How long a home without a claim for a connection asks every member whether it serves
    /// it (dropping the connection's packets meanwhile; the client sends them again) before it
    /// gives them to its kernel. Zero: it asks nobody.
    pub query_grace: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            refresh: Duration::from_secs(10),
            ttl: Duration::from_secs(35),
            settle: Duration::from_secs(3),
            query_grace: Duration::from_secs(3),
        }
    }
}

/// A home teaches one entry about one flow at most this often.
const RETEACH: Duration = Duration::from_millis(500);
/// Most (entry, flow) pairs remembered as taught; beyond, the memory starts over.
const MAX_TAUGHT: usize = 4096;
/// New connections queued for their homes between two ticks; beyond, the next tick tells
/// every home everything instead.
const MAX_NEW_SERVED: usize = 16_384;
/// A sync request is sent twice (datagrams may be lost), this far apart.
const SYNC_AGAIN: Duration = Duration::from_secs(2);
/// A member's sync requests are answered at most this often (each answer walks the flow tables).
const SYNC_ANSWER_EVERY: Duration = Duration::from_secs(10);
/// A pending query is sent again this often.
const QUERY_AGAIN: Duration = Duration::from_millis(500);
/// Most flows queried at once; beyond, a packet nobody claims goes to the kernel at once (a
/// flood of made-up ACKs must not turn into a flood of queries).
const MAX_QUERIES: usize = 4096;
/// Most flows queried per tick; the rest go in the next ticks.
const QUERIES_PER_TICK: usize = 2 * MAX_FLOWS;
/// Flow-recovery messages sent to one member per tick (100 ms): 80 a second stays well below a
/// member's rate limit for one peer (200 datagrams a second) beside probes and loads. Claims
/// beyond wait for the next ticks.
const MESSAGES_PER_PEER_PER_TICK: usize = 8;
/// Most messages queued for one member; beyond, the oldest claims go (the refresh repeats them).
const MAX_QUEUED_PER_PEER: usize = 4096;

/// Messages waiting for one member: answers and the like first, then claims.
#[derive(Debug, Default)]
struct PeerQueue {
    urgent: std::collections::VecDeque<FlowMessage>,
    claims: std::collections::VecDeque<FlowMessage>,
}

/// Per-member bookkeeping, indexed by [`NodeId`].
#[derive(Debug, Clone, Copy, Default)]
struct PeerSync {
    /// Sync requests sent to it in this daemon's life, and when the last went.
    asked: u8,
    asked_at: Timestamp,
    /// When this node last answered its request, and whether one waits.
    answered_at: Option<Timestamp>,
    pending: bool,
}

/// The recovery state of one [`Node`].
#[derive(Debug)]
pub(super) struct Recovery {
    config: RecoveryConfig,
    directory: Directory,
    new_served: Vec<FlowKey>,
    overflowed: bool,
    teach: Vec<(NodeId, NodeId, FlowKey)>,
    taught: hashbrown::HashMap<(NodeId, FlowKey), Timestamp>,
    /// Messages per member (indexed by [`NodeId`]): answers, sync requests and queries in
    /// front, claims behind; sent at most [`MESSAGES_PER_PEER_PER_TICK`] a tick.
    queues: Vec<PeerQueue>,
    /// The homes when claims last went out in full, to resend only the claims whose home moved.
    sent_homes: Vec<crate::Candidate>,
    /// Messages that may still go this tick, per member; and the member to poll next.
    budget: Vec<usize>,
    next_peer: usize,
    /// Flows a home has no claim for: when it first asked and last asked.
    queries: hashbrown::HashMap<FlowKey, (Timestamp, Timestamp)>,
    to_query: Vec<FlowKey>,
    started: bool,
    settle_until: Timestamp,
    next_refresh: Timestamp,
    next_expire: Timestamp,
    /// Fingerprint of the members that are homes.
    homes: u64,
    peers: Vec<PeerSync>,
}

impl Recovery {
    pub(super) fn new(config: RecoveryConfig, quota: u32, seed: u64) -> Self {
        Recovery {
            directory: Directory::new(quota, config.ttl, seed),
            config,
            new_served: Vec::new(),
            overflowed: false,
            teach: Vec::new(),
            taught: hashbrown::HashMap::new(),
            queues: Vec::new(),
            sent_homes: Vec::new(),
            budget: Vec::new(),
            next_peer: 0,
            queries: hashbrown::HashMap::new(),
            to_query: Vec::new(),
            started: false,
            settle_until: Timestamp::ZERO,
            next_refresh: Timestamp::ZERO,
            next_expire: Timestamp::ZERO,
            homes: 0,
            peers: Vec::new(),
        }
    }

    /// Whether a home without a claim should still drop rather than deliver.
    fn settling(&self, now: Timestamp) -> bool {
        (!self.started && !self.config.settle.is_zero()) || now < self.settle_until
    }

    fn queue(&mut self, id: NodeId) -> &mut PeerQueue {
        if self.queues.len() <= id.index() {
            self.queues.resize_with(id.index() + 1, Default::default);
        }
        &mut self.queues[id.index()]
    }

    /// Queues an answer, a teaching, a sync request or a query: sent before any claim.
    fn urgent(&mut self, to: NodeId, msg: FlowMessage) {
        let q = &mut self.queue(to).urgent;
        if q.len() < MAX_QUEUED_PER_PEER {
            q.push_back(msg);
        }
    }

    /// Queues claims; the oldest claims go when the queue is full (a refresh repeats them).
    fn claim(&mut self, to: NodeId, msg: FlowMessage) {
        let q = &mut self.queue(to).claims;
        if q.len() >= MAX_QUEUED_PER_PEER {
            q.pop_front();
        }
        q.push_back(msg);
    }

    /// Whether a packet of `key`, which nobody has claimed, is dropped while the members are
    /// asked (`true`), or given to the kernel now.
    fn ask(&mut self, now: Timestamp, key: &FlowKey, settling: bool) -> bool {
        let grace = self.config.query_grace;
        if grace.is_zero() {
            return settling;
        }
        let room = self.queries.len() < MAX_QUERIES;
        match self.queries.get_mut(key) {
            Some((first, last)) => {
                let waiting = now.saturating_since(*first) < grace;
                if waiting && now.saturating_since(*last) >= QUERY_AGAIN {
                    *last = now;
                    self.to_query.push(*key);
                }
                waiting || settling
            }
            None if room => {
                self.queries.insert(*key, (now, now));
                self.to_query.push(*key);
                true
            }
            None => settling,
        }
    }

    fn peer(&mut self, id: NodeId) -> &mut PeerSync {
        if self.peers.len() <= id.index() {
            self.peers.resize(id.index() + 1, PeerSync::default());
        }
        &mut self.peers[id.index()]
    }
}

/// The flow's home among `candidates` (filled once for many flows).
fn home_in(key: &FlowKey, candidates: &[crate::Candidate]) -> Option<NodeId> {
    match consistent_hash(key, candidates) {
        Placement::Chosen(id) => Some(id),
        Placement::NoCandidate => None,
    }
}

fn client_flow(key: &FlowKey) -> ClientFlow {
    ClientFlow { proto: key.proto, client: key.src(), client_port: key.src_port, vip_port: key.dst_port }
}

impl Node {
    /// Claims in this node's directory (it is their flows' home).
    pub fn directory_len(&self) -> usize {
        self.recovery.directory.len()
    }

    /// The next flow-recovery message to send, and to whom (a member's name).
    /// At most a few per member per tick (see [`Node::handle_timeout`]); the rest wait.
    pub fn poll_flow_message(&mut self) -> Option<(String, FlowMessage)> {
        let r = &mut self.recovery;
        let n = r.queues.len();
        for _ in 0..n {
            let i = r.next_peer % n;
            r.next_peer = (i + 1) % n;
            if r.budget.get(i).copied().unwrap_or(0) == 0 {
                continue;
            }
            let q = &mut r.queues[i];
            let Some(msg) = q.urgent.pop_front().or_else(|| q.claims.pop_front()) else { continue };
            r.budget[i] -= 1;
            match self.members.get(NodeId(u16::try_from(i).unwrap_or(u16::MAX))) {
                Some(m) if !m.state.is_gone() => return Some((m.name.clone(), msg)),
                // Gone: what was queued for it goes.
                _ => *q = PeerQueue::default(),
            }
        }
        None
    }

    /// Whether this node's kernel serves `key`'s connection, as far as the daemon knows.
    pub(super) fn serves(&self, key: &FlowKey) -> bool {
        self.served.find(key).is_some()
            || self.flows.find(key).is_some_and(|h| self.flows.target(h) == self.config.local)
    }

    /// The members that are homes: every member not gone, alike (no weight, load or drain:
    /// homes move only when members come and go, not when they drain or their load flaps).
    fn fill_homes(&mut self) {
        self.homes.clear();
        for (id, m) in self.members.iter() {
            if !m.state.is_gone() && !m.is_removed() {
                self.homes.push(crate::Candidate {
                    id,
                    weight: 1.0,
                    load: 0.0,
                    eligible: true,
                    name_hash: m.name_hash,
                });
            }
        }
    }

    /// The flow's home in this node's view.
    fn home(&mut self, key: &FlowKey) -> Option<NodeId> {
        self.fill_homes();
        home_in(key, &self.homes)
    }

    /// Whether `id` may still hold connections: any member not dead (one that left only
    /// stopped its daemon; its kernel keeps serving).
    fn is_live(&self, id: NodeId) -> bool {
        self.members.get(id).is_some_and(|m| m.state != MemberState::Dead)
    }

    /// A TCP connection this node serves was confirmed: its home will hear of it.
    pub(super) fn note_served(&mut self, key: &FlowKey) {
        if key.proto != IPPROTO_TCP {
            return;
        }
        let r = &mut self.recovery;
        if r.new_served.len() < MAX_NEW_SERVED {
            r.new_served.push(*key);
        } else {
            r.overflowed = true;
        }
    }

    /// Where a packet of a connection this entry does not know goes (its first such packet;
    /// the flow is then pinned there). `Err` drops it: nobody has claimed it yet and the
    /// directory is settling.
    pub(super) fn recover_at_entry(&mut self, now: Timestamp, key: &FlowKey) -> Result<NodeId, DropReason> {
        let local = self.config.local;
        if self.served.find(key).is_some() {
            return Ok(local); // an entry change brought it to the node serving it
        }
        let Some(home) = self.home(key) else { return Ok(local) };
        self.counters.placed_by_hash_fallback += 1;
        if home != local {
            return Ok(home);
        }
        match self.recovery.directory.lookup(now, key) {
            Some(server) if server != local && self.is_live(server) => {
                self.counters.flows_recovered += 1;
                Ok(server)
            }
            Some(_) => Ok(local),
            None => {
                let settling = self.recovery.settling(now);
                if self.recovery.ask(now, key, settling) {
                    return Err(DropReason::UnclaimedFlow);
                }
                self.counters.flows_unrecovered += 1;
                Ok(local)
            }
        }
    }

    /// A carrier packet of a TCP connection this node does not serve: if this node's directory
    /// says who does, the packet goes on to it (and the entry `from` learns the server).
    /// `None`: deliver it here.
    pub(super) fn second_hop(&mut self, now: Timestamp, from: NodeId, meta: &PacketMeta) -> Option<Verdict> {
        let key = &meta.key;
        let local = self.config.local;
        // A node that is not the flow's home in its own view asks too: the entry's view of the
        // members may differ (it just started), and the server answers whoever asks.
        match self.recovery.directory.lookup(now, key) {
            // The entry serves it itself and did not know: it learns so; this packet is lost
            // (the client sends it again), never bounced back.
            Some(server) if server == from => {
                self.teach(now, from, server, key);
                self.counters.count_drop(DropReason::UnclaimedFlow);
                Some(Verdict::Drop(DropReason::UnclaimedFlow))
            }
            Some(server) if server != local && self.is_live(server) => {
                let addr = self.members.get(server)?.addr;
                self.teach(now, from, server, key);
                self.counters.second_hop_packets += 1;
                self.forwarded_to[server.index()] += 1;
                Some(Verdict::Forward { peer: server, addr, flow_hash: key.stable_hash() })
            }
            Some(_) => None,
            None => {
                let settling = self.recovery.settling(now);
                if self.recovery.ask(now, key, settling) {
                    self.counters.count_drop(DropReason::UnclaimedFlow);
                    return Some(Verdict::Drop(DropReason::UnclaimedFlow));
                }
                self.counters.unclaimed_delivered += 1;
                None
            }
        }
    }

    /// Queues "`key` is served by `server`" for `entry`, at most once per [`RETEACH`].
    fn teach(&mut self, now: Timestamp, entry: NodeId, server: NodeId, key: &FlowKey) {
        let r = &mut self.recovery;
        if r.taught.get(&(entry, *key)).is_some_and(|t| now.saturating_since(*t) < RETEACH) {
            return;
        }
        if r.taught.len() >= MAX_TAUGHT {
            r.taught.clear();
        }
        r.taught.insert((entry, *key), now);
        r.teach.push((entry, server, *key));
    }

    /// A flow-recovery message from the live member `from` (the control plane checked who).
    pub(super) fn apply_flow_message(&mut self, now: Timestamp, from: &str, msg: &FlowMessage) {
        let Some(from) = self.members.by_name(from).filter(|&id| id != self.config.local && self.is_live(id)) else {
            return;
        };
        let vip = self.config.vip;
        let key_of = |f: &ClientFlow| FlowKey::new(f.client, vip, f.client_port, f.vip_port, f.proto);
        match msg {
            FlowMessage::Serves(flows) => {
                for f in flows {
                    if f.proto != IPPROTO_TCP || f.client.is_ipv4() != vip.is_ipv4() {
                        self.counters.claims_refused_invalid += 1;
                        continue;
                    }
                    let key = key_of(f);
                    match self.recovery.directory.claim(now, key, from) {
                        Ok(()) => {
                            self.recovery.queries.remove(&key);
                            self.counters.claims_accepted += 1;
                        }
                        Err(ClaimRefused::Quota) => self.counters.claims_refused_quota += 1,
                        Err(ClaimRefused::Conflict) => self.counters.claims_refused_conflict += 1,
                    }
                }
            }
            FlowMessage::Teach { server, flows } => {
                let server = self.members.by_name(server).filter(|&id| self.is_live(id));
                for f in flows {
                    let handle =
                        self.flows.find(&key_of(f)).filter(|&h| f.proto == IPPROTO_TCP && self.flows.target(h) == from);
                    match (server, handle) {
                        // Only the node this entry sent the flow to may say where it lives.
                        (Some(server), Some(h)) => {
                            self.flows.retarget(h, server);
                            self.counters.flows_recovered += 1;
                        }
                        _ => self.counters.teach_refused += 1,
                    }
                }
            }
            FlowMessage::Sync => {
                let p = self.recovery.peer(from);
                p.pending = true;
            }
            FlowMessage::Query(flows) => {
                // Only whether this node serves them: the asker learns nothing else.
                let mine: Vec<ClientFlow> = flows
                    .iter()
                    .filter(|f| f.proto == IPPROTO_TCP && f.client.is_ipv4() == vip.is_ipv4())
                    .filter(|f| self.serves(&key_of(f)))
                    .copied()
                    .collect();
                self.counters.queries_answered += 1;
                if !mine.is_empty() {
                    self.recovery.urgent(from, FlowMessage::Serves(mine));
                }
            }
        }
    }

    /// Recovery's periodic work, from [`Node::handle_timeout`]: sync requests, claims to the
    /// homes, teaching, expiry.
    pub(super) fn recovery_tick(&mut self, now: Timestamp) {
        let local = self.config.local;
        if !self.recovery.started {
            let r = &mut self.recovery;
            r.started = true;
            r.settle_until = now.saturating_add(r.config.settle);
            r.next_refresh = now.saturating_add(r.config.refresh);
            r.next_expire = now.saturating_add(r.config.ttl / 4);
        }
        // Which members are homes; a change moves homes, so every server tells them again.
        self.fill_homes();
        let homes = self.homes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, c| ringlb_wire::mix64(h ^ c.name_hash));
        let mut everything = std::mem::take(&mut self.recovery.overflowed);
        let mut moved = false;
        if homes != self.recovery.homes {
            self.recovery.homes = homes;
            // Servers and entries see the change at slightly different times, so for a while an
            // entry may ask a node that the flow's server did not tell.
            let settle = self.recovery.config.settle;
            self.recovery.settle_until = self.recovery.settle_until.max(now.saturating_add(settle));
            moved = true;
        }
        if now >= self.recovery.next_refresh {
            self.recovery.next_refresh = now.saturating_add(self.recovery.config.refresh);
            everything = true;
        }
        // Ask every live peer, twice, for the claims homed here.
        let ids: Vec<NodeId> =
            self.members.iter().filter(|(id, m)| *id != local && !m.state.is_gone()).map(|(id, _)| id).collect();
        let mut answer_to = Vec::new();
        for id in ids {
            let p = self.recovery.peer(id);
            if p.asked < 2 && (p.asked == 0 || now.saturating_since(p.asked_at) >= SYNC_AGAIN) {
                p.asked += 1;
                p.asked_at = now;
                self.recovery.urgent(id, FlowMessage::Sync);
            }
            let p = self.recovery.peer(id);
            if p.pending && p.answered_at.is_none_or(|t| now.saturating_since(t) >= SYNC_ANSWER_EVERY) {
                p.pending = false;
                p.answered_at = Some(now);
                answer_to.push(id);
            }
        }
        // Claims: the new connections, or all of them.
        let mut claims: Vec<FlowKey> = std::mem::take(&mut self.recovery.new_served);
        if everything || moved || !answer_to.is_empty() {
            let mut all = Vec::new();
            self.served.for_each_established(|k, _| all.push(*k));
            self.flows.for_each_established(|k, t| {
                if t == local {
                    all.push(*k);
                }
            });
            if everything {
                claims = all;
            } else {
                // The claims whose home moved since they last went out, and those the asking
                // peers are home of, beside the new ones.
                let before = &self.recovery.sent_homes;
                for k in all {
                    let home = home_in(&k, &self.homes);
                    if (moved && home_in(&k, before) != home) || home.is_some_and(|h| answer_to.contains(&h)) {
                        claims.push(k);
                    }
                }
            }
        }
        let mut by_home: hashbrown::HashMap<NodeId, Vec<ClientFlow>> = hashbrown::HashMap::new();
        for k in &claims {
            if let Some(home) = home_in(k, &self.homes).filter(|&h| h != local) {
                by_home.entry(home).or_default().push(client_flow(k));
            }
        }
        if everything {
            // A new full set replaces the claims still waiting.
            for q in &mut self.recovery.queues {
                q.claims.clear();
            }
        }
        if everything || moved {
            self.recovery.sent_homes.clone_from(&self.homes);
        }
        for (home, flows) in by_home {
            for chunk in flows.chunks(MAX_FLOWS) {
                self.recovery.claim(home, FlowMessage::Serves(chunk.to_vec()));
            }
        }
        // Queries go to every live peer.
        let r = &mut self.recovery;
        let to_query: Vec<FlowKey> = r.to_query.drain(..r.to_query.len().min(QUERIES_PER_TICK)).collect();
        if !to_query.is_empty() {
            let peers: Vec<NodeId> =
                self.members.iter().filter(|(id, m)| *id != local && !m.state.is_gone()).map(|(id, _)| id).collect();
            let flows: Vec<ClientFlow> = to_query.iter().map(client_flow).collect();
            for chunk in flows.chunks(MAX_FLOWS) {
                self.counters.queries_sent += 1;
                for &p in &peers {
                    self.recovery.urgent(p, FlowMessage::Query(chunk.to_vec()));
                }
            }
        }
        let keep = self.recovery.config.query_grace * 4;
        self.recovery.queries.retain(|_, (first, _)| now.saturating_since(*first) < keep);
        // Teaching, grouped by entry and server.
        let mut teach = std::mem::take(&mut self.recovery.teach);
        teach.sort_unstable_by_key(|&(entry, server, _)| (entry, server));
        for group in teach.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (entry, server) = (group[0].0, group[0].1);
            let Some(name) = self.members.get(server).map(|m| m.name.clone()) else { continue };
            let flows: Vec<ClientFlow> = group.iter().map(|(_, _, k)| client_flow(k)).collect();
            for chunk in flows.chunks(MAX_FLOWS) {
                self.recovery.urgent(entry, FlowMessage::Teach { server: name.clone(), flows: chunk.to_vec() });
            }
        }
        if now >= self.recovery.next_expire {
            self.recovery.next_expire = now.saturating_add(self.recovery.config.ttl / 4);
            self.recovery.directory.expire(now);
        }
        // This tick's sending budget.
        let n = self.recovery.queues.len();
        self.recovery.budget.clear();
        self.recovery.budget.resize(n, MESSAGES_PER_PEER_PER_TICK);
    }

    /// A member was forgotten: its claims go (its id may be reused).
    pub(super) fn recovery_forget(&mut self, id: NodeId) {
        self.recovery.directory.forget_server(id);
        if let Some(p) = self.recovery.peers.get_mut(id.index()) {
            *p = PeerSync::default();
        }
    }
}

const IPPROTO_TCP: u8 = 6;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FailurePolicy, FlowConfig, Member, Members, NodeConfig, Policy, Update};
    use ringlb_wire::build::tcp_v4;
    use std::net::{IpAddr, Ipv4Addr};

    const VIP: [u8; 4] = [10, 200, 0, 10];
    const CLIENT: [u8; 4] = [10, 78, 0, 100];
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const E: NodeId = NodeId(0);
    const H: NodeId = NodeId(1);
    const S: NodeId = NodeId(2);

    fn addr(id: NodeId) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 77, 0, u8::try_from(id.0 + 1).unwrap()))
    }

    fn name(id: NodeId) -> String {
        format!("n{}", id.0 + 1)
    }

    /// Node `local` of n1..n3, with the default timers (a 3 s settle).
    fn node(local: NodeId) -> Node {
        let members = Members::new((0..3).map(|i| Member::new(name(NodeId(i)), addr(NodeId(i)), 1.0))).unwrap();
        let config = NodeConfig {
            local,
            vip: IpAddr::V4(VIP.into()),
            tun_mtu: 1472,
            flows: FlowConfig::default(),
            policy: Policy::PowerOfTwo { margin: 0.0 },
            seed: 7 + u64::from(local.0),
            on_failure: FailurePolicy::Reset,
            load_stale_after: Duration::from_secs(1),
            require_load: false,
            recovery: RecoveryConfig::default(),
        };
        Node::new(config, members)
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_duration(Duration::from_millis(ms))
    }

    fn tcp(port: u16, flags: u8) -> Vec<u8> {
        tcp_v4(CLIENT, VIP, port, 80, flags, &[])
    }

    fn key(port: u16) -> FlowKey {
        ringlb_wire::classify(&tcp(port, ACK)).unwrap().key
    }

    fn peer(v: Verdict) -> Option<NodeId> {
        match v {
            Verdict::Forward { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// Every message `from` has queued, handed to the members they are for.
    fn exchange(now: Timestamp, from: &mut Node, nodes: &mut [&mut Node]) -> usize {
        let sender = name(from.config.local);
        let mut n = 0;
        while let Some((to, msg)) = from.poll_flow_message() {
            if let Some(node) = nodes.iter_mut().find(|n| name(n.config.local) == to) {
                node.apply(now, &Update::Flow { from: sender.clone(), msg }).unwrap();
                n += 1;
            }
        }
        n
    }

    /// A client port whose connection `entry` places on `server` while its home is `home`.
    fn port_placed_on(entry: &mut Node, server: NodeId, home: NodeId) -> u16 {
        (1000..2000)
            .find(|&p| {
                entry.home(&key(p)) == Some(home) && peer(entry.on_tun_packet(at(0), &mut tcp(p, SYN))) == Some(server)
            })
            .expect("such a port")
    }

    #[test]
    fn a_restarted_entry_finds_the_server_through_the_home_and_then_goes_straight_there() {
        let (mut e, mut h, mut s) = (node(E), node(H), node(S));
        for n in [&mut e, &mut h, &mut s] {
            n.handle_timeout(at(0));
        }
        // The entry places the connection on S; S serves it, and once it is established tells
        // its home H.
        let port = port_placed_on(&mut e, S, H);
        assert_eq!(s.on_carrier_packet(at(1), addr(E), &tcp(port, SYN)), Verdict::Deliver);
        assert_eq!(peer(e.on_tun_packet(at(2), &mut tcp(port, ACK))), Some(S));
        assert_eq!(s.on_carrier_packet(at(2), addr(E), &tcp(port, ACK)), Verdict::Deliver);
        s.handle_timeout(at(100));
        exchange(at(100), &mut s, &mut [&mut h, &mut e]);
        assert_eq!(h.directory_len(), 1);
        assert_eq!(h.counters().claims_accepted, 1);

        // The entry's daemon restarts: it knows nothing, and sends the next packet to the home,
        // which passes it on to S and teaches the entry.
        let mut e = node(E);
        e.handle_timeout(at(4_000));
        assert_eq!(peer(e.on_tun_packet(at(4_000), &mut tcp(port, ACK))), Some(H));
        assert_eq!(peer(h.on_carrier_packet(at(4_000), addr(E), &tcp(port, ACK))), Some(S));
        assert_eq!(h.counters().second_hop_packets, 1);
        h.handle_timeout(at(4_100));
        exchange(at(4_100), &mut h, &mut [&mut e, &mut s]);
        assert_eq!(e.counters().flows_recovered, 1);
        for t in [4_101, 4_200, 9_000] {
            assert_eq!(peer(e.on_tun_packet(at(t), &mut tcp(port, ACK))), Some(S), "straight to the server");
        }
        // S delivers what reaches it either way.
        assert_eq!(s.on_carrier_packet(at(4_000), addr(H), &tcp(port, ACK)), Verdict::Deliver);
    }

    #[test]
    fn a_restarted_home_asks_the_servers_again_and_drops_only_while_it_settles() {
        let (mut e, mut s) = (node(E), node(S));
        e.handle_timeout(at(0));
        s.handle_timeout(at(0));
        let port = port_placed_on(&mut e, S, H);
        s.on_carrier_packet(at(1), addr(E), &tcp(port, SYN));
        s.on_carrier_packet(at(2), addr(E), &tcp(port, ACK));
        s.handle_timeout(at(100));
        while s.poll_flow_message().is_some() {} // the home is down: lost

        // H starts: until it heard from the servers, a packet it has no claim for is dropped
        // (the client sends it again), not handed to its kernel to be reset.
        let mut h = node(H);
        h.handle_timeout(at(1_000));
        let unknown = (3000..4000).find(|&p| h.home(&key(p)) == Some(H)).unwrap();
        assert_eq!(
            h.on_carrier_packet(at(1_500), addr(E), &tcp(unknown, ACK)),
            Verdict::Drop(DropReason::UnclaimedFlow)
        );
        // Its sync request makes S tell it again.
        assert_eq!(exchange(at(1_000), &mut h, &mut [&mut e, &mut s]), 2);
        s.handle_timeout(at(1_100));
        exchange(at(1_100), &mut s, &mut [&mut h]);
        assert_eq!(peer(h.on_carrier_packet(at(1_200), addr(E), &tcp(port, ACK))), Some(S));
        // Settled, a flow nobody claims is asked about for 3 s, then it is the kernel's to answer.
        h.handle_timeout(at(4_100));
        assert_eq!(
            h.on_carrier_packet(at(4_100), addr(E), &tcp(unknown, ACK)),
            Verdict::Drop(DropReason::UnclaimedFlow)
        );
        h.handle_timeout(at(4_200));
        assert!(exchange(at(4_200), &mut h, &mut [&mut e, &mut s]) >= 2, "nobody was asked");
        s.handle_timeout(at(4_300));
        while let Some((_, msg)) = s.poll_flow_message() {
            if let FlowMessage::Serves(flows) = msg {
                assert!(flows.iter().all(|f| f.client_port != unknown), "S answered for a flow it does not serve");
            }
        }
        assert_eq!(h.on_carrier_packet(at(4_600), addr(E), &tcp(unknown, ACK)), Verdict::Deliver);
        assert_eq!(h.counters().unclaimed_delivered, 1);

        // A claim lost on the way: the home asks, the server answers, the packet goes on.
        let lost = (port + 1..port + 2000).find(|&p| h.home(&key(p)) == Some(H)).unwrap();
        s.on_carrier_packet(at(5_000), addr(E), &tcp(lost, SYN));
        s.on_carrier_packet(at(5_001), addr(E), &tcp(lost, ACK));
        s.handle_timeout(at(5_100));
        while s.poll_flow_message().is_some() {} // lost
        assert_eq!(h.on_carrier_packet(at(5_200), addr(E), &tcp(lost, ACK)), Verdict::Drop(DropReason::UnclaimedFlow));
        h.handle_timeout(at(5_300));
        exchange(at(5_300), &mut h, &mut [&mut e, &mut s]);
        s.handle_timeout(at(5_400));
        exchange(at(5_400), &mut s, &mut [&mut h]);
        assert_eq!(peer(h.on_carrier_packet(at(5_500), addr(E), &tcp(lost, ACK))), Some(S));
    }

    #[test]
    fn claims_and_answers_are_checked_against_who_sends_them() {
        let (mut e, mut h) = (node(E), node(H));
        e.handle_timeout(at(0));
        h.handle_timeout(at(0));
        let flow = |port| ClientFlow { proto: 6, client: IpAddr::V4(CLIENT.into()), client_port: port, vip_port: 80 };
        let from = |n: NodeId, msg| Update::Flow { from: name(n), msg };
        // A claim is its sender's own; a second member's claim on a fresh record is refused, and
        // so are UDP and another address family.
        h.apply(at(1), &from(S, FlowMessage::Serves(vec![flow(1)]))).unwrap();
        h.apply(at(2), &from(E, FlowMessage::Serves(vec![flow(1)]))).unwrap();
        let udp = ClientFlow { proto: 17, ..flow(2) };
        let v6 = ClientFlow { client: "2001:db8::1".parse().unwrap(), ..flow(3) };
        h.apply(at(2), &from(E, FlowMessage::Serves(vec![udp, v6]))).unwrap();
        let c = h.counters();
        assert_eq!((c.claims_accepted, c.claims_refused_conflict, c.claims_refused_invalid), (1, 1, 2));
        assert_eq!(h.recovery.directory.lookup(at(3), &key(1)), Some(S));
        // Nor does a stranger's word count: not a member, no effect.
        h.apply(at(3), &Update::Flow { from: "mallory".into(), msg: FlowMessage::Serves(vec![flow(9)]) }).unwrap();
        assert_eq!(h.directory_len(), 1);

        // The entry takes "served by" only from the node it sent the flow to, naming a live member.
        let port = (5000..6000).find(|&p| e.home(&key(p)) == Some(H)).unwrap();
        e.handle_timeout(at(4_000));
        assert_eq!(peer(e.on_tun_packet(at(4_000), &mut tcp(port, ACK))), Some(H));
        let teach = |server: &str| FlowMessage::Teach { server: server.into(), flows: vec![flow(port)] };
        e.apply(at(4_001), &from(S, teach("n3"))).unwrap();
        e.apply(at(4_001), &from(H, teach("nobody"))).unwrap();
        assert_eq!(e.counters().teach_refused, 2);
        assert_eq!(peer(e.on_tun_packet(at(4_002), &mut tcp(port, ACK))), Some(H), "moved by a refused answer");
        e.apply(at(4_003), &from(H, teach("n3"))).unwrap();
        assert_eq!(peer(e.on_tun_packet(at(4_004), &mut tcp(port, ACK))), Some(S));
    }

    #[test]
    fn a_member_holds_at_most_its_quota_of_claims() {
        let mut h = node(H);
        h.recovery.directory = Directory::new(10, Duration::from_secs(35), 1);
        let flows: Vec<ClientFlow> = (0..u16::try_from(MAX_FLOWS).unwrap())
            .map(|p| ClientFlow { proto: 6, client: IpAddr::V4(CLIENT.into()), client_port: p, vip_port: 80 })
            .collect();
        h.apply(at(0), &Update::Flow { from: name(S), msg: FlowMessage::Serves(flows) }).unwrap();
        assert_eq!((h.counters().claims_accepted, h.counters().claims_refused_quota), (10, MAX_FLOWS as u64 - 10));
    }
}
