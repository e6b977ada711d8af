//! The per-node state machine: packets in, verdicts out.

use std::net::IpAddr;
use std::time::Duration;

use ringlb_wire::{clamp_tcp_mss, classify, FlowKey, PacketMeta, L4};

use crate::placement::{consistent_hash, Placement};
use crate::{
    Candidate, Counters, DropReason, FlowConfig, FlowState, FlowTable, LoadReport, Member, MemberState, Members,
    NodeId, PlacedBy, Policy, Rng, Timestamp,
};

mod offload;
mod recovery;
mod restart;
mod sites;
pub use offload::{OffloadCounters, OffloadOp, OffloadUsage, Offloaded};
pub use recovery::RecoveryConfig;
pub use restart::FlowsNeedingDaemon;

/// What the IO layer must do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the packet to the local kernel (write it back into the TUN).
    Deliver,
    /// Send the packet over the carrier to a peer.
    Forward {
        peer: NodeId,
        /// The peer's underlay address.
        addr: IpAddr,
        /// Stable hash of the flow, for the carrier's outer source port.
        flow_hash: u64,
    },
    Drop(DropReason),
}

/// Static facts a node needs to decide.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's entry in the member list.
    pub local: NodeId,
    /// The service address every member owns.
    pub vip: IpAddr,
    /// MTU of the TUN device; forwarded SYNs get their MSS clamped to fit it.
    pub tun_mtu: u16,
    pub flows: FlowConfig,
    pub policy: Policy,
    /// Seeds the placement RNG and the flow-table hash key.
    pub seed: u64,
    /// What happens to TCP flows pinned to a member that died.
    pub on_failure: FailurePolicy,
    /// A member whose load vectors stop arriving for this long takes no new flows, as if
    /// suspect.
    pub load_stale_after: Duration,
    /// Whether a member takes new flows only once its first load vector arrived (over its
    /// authenticated control connection). On with a control plane; off for static member lists,
    /// which have no load vectors.
    pub require_load: bool,
    /// Flow recovery's timers (see the `recovery` module).
    pub recovery: RecoveryConfig,
}

/// What to do with TCP flows pinned to a member that died (UDP flows are always re-placed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Hand the flow's packets to the local kernel, which has no such connection and answers
    /// with a RST: the client reconnects at once instead of hanging.
    Reset,
    /// Place the flow anew; the new server resets it unless it shares connection state.
    Replace,
}

/// One ringlb node's decisions. See the crate documentation.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    members: Members,
    flows: FlowTable,
    rng: Rng,
    counters: Counters,
    /// Packets forwarded, by peer.
    forwarded_to: Vec<u64>,
    /// Reused for every placement, so placing allocates nothing.
    candidates: Vec<Candidate>,
    /// The members that are homes (see the `recovery` module), refilled when asked.
    homes: Vec<Candidate>,
    /// Flows this node serves that other entries forwarded here, to report its own load.
    served: FlowTable,
    /// New UDP flows are placed by hash until then: a UDP flow placed by hash under pressure
    /// and not tracked (or evicted) has no first packet to tell it apart, so the policy must
    /// not place its later datagrams until they would have idled out.
    hash_udp_until: Timestamp,
    recovery: recovery::Recovery,
    sites: sites::SiteScratch,
    /// New flows placed, by member (per-site metrics add them up).
    placed_to: Vec<u64>,
    /// Flows a kernel fast path carries, when there is one (see the `offload` module).
    offload: Option<offload::Offload>,
    /// The time of the packet being handled, for the offload rules.
    offload_now: Timestamp,
}

impl Node {
    /// `config.local` must name an entry of `members`.
    pub fn new(config: NodeConfig, members: Members) -> Self {
        assert!(members.get(config.local).is_some(), "local node {:?} is not a member", config.local);
        let mut rng = Rng::seed(config.seed);
        let flows = FlowTable::new(config.flows.clone(), rng.next_u64());
        let served = FlowTable::new(config.flows.clone(), rng.next_u64());
        let quota = u32::try_from(config.flows.max_flows).unwrap_or(u32::MAX);
        let recovery = recovery::Recovery::new(config.recovery.clone(), quota, rng.next_u64());
        Node {
            recovery,
            served,
            forwarded_to: vec![0; members.len()],
            placed_to: vec![0; members.len()],
            sites: sites::SiteScratch::default(),
            candidates: Vec::with_capacity(members.len()),
            homes: Vec::with_capacity(members.len()),
            config,
            members,
            flows,
            rng,
            counters: Counters::default(),
            hash_udp_until: Timestamp::ZERO,
            offload: None,
            offload_now: Timestamp::ZERO,
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn members(&self) -> &Members {
        &self.members
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// New flows this node placed on `member` so far.
    pub fn placed_on(&self, member: NodeId) -> u64 {
        self.placed_to.get(member.index()).copied().unwrap_or(0)
    }

    /// Packets forwarded to `peer` so far.
    pub fn forwarded_to(&self, peer: NodeId) -> u64 {
        self.forwarded_to.get(peer.index()).copied().unwrap_or(0)
    }

    /// Counts a drop the IO layer saw (send or write failures, bad outer headers).
    pub fn count_drop(&mut self, reason: DropReason) {
        self.counters.count_drop(reason);
    }

    /// Counts a batch of `n` packets the IO layer lost as a whole.
    pub fn count_drops(&mut self, reason: DropReason, n: u64) {
        self.counters.count_drops(reason, n);
    }

    fn drop(&mut self, reason: DropReason) -> Verdict {
        self.counters.count_drop(reason);
        Verdict::Drop(reason)
    }

    /// A packet read from the TUN: a client's packet for the VIP entering the cluster here.
    ///
    /// May rewrite the packet in place (MSS clamping of forwarded SYNs).
    pub fn on_tun_packet(&mut self, now: Timestamp, pkt: &mut [u8]) -> Verdict {
        let meta = match classify(pkt) {
            Ok(m) => m,
            Err(e) => return self.drop(e.into()),
        };
        if !meta.key.dst_is(self.config.vip) {
            return self.drop(DropReason::NotVip);
        }
        let target = match meta.l4 {
            // An error about a packet a server sent (e.g. "fragmentation needed" for a DSR
            // reply) goes to the node serving that flow, so its path-MTU discovery works.
            L4::Icmp { error_for: Some(flow) } => self.icmp_error_target(now, &flow),
            // Other ICMP has no ports to pin; every member owns the VIP, so answer here.
            L4::Icmp { error_for: None } => self.config.local,
            _ => match self.flow_target(now, &meta) {
                Ok(target) => target,
                Err(reason) => return self.drop(reason),
            },
        };
        if self.offload.is_some() && !matches!(meta.l4, L4::Icmp { .. }) {
            self.offload_now = now;
            self.offer_entry_flow(&meta.key, meta.key.stable_hash(), meta.is_tcp_syn());
        }
        if target == self.config.local {
            self.counters.delivered_local += 1;
            return Verdict::Deliver;
        }
        if meta.is_tcp_syn() && clamp_tcp_mss(pkt, self.max_mss()) {
            self.counters.mss_clamped += 1;
        }
        let Some(addr) = self.members.get(target).map(|m| m.addr) else {
            // Unreachable: flows only ever name members. Serve rather than lose the packet.
            self.counters.delivered_local += 1;
            return Verdict::Deliver;
        };
        self.counters.forwarded += 1;
        self.forwarded_to[target.index()] += 1;
        Verdict::Forward { peer: target, addr, flow_hash: meta.key.stable_hash() }
    }

    /// A carrier packet from `outer_src` whose payload is `inner`: a flow another entry placed
    /// here. Accepted only from members' underlay addresses and only for the VIP.
    ///
    /// A member this node holds dead or left is still a member until the cluster forgets it:
    /// its packets are delivered, so that when views differ the local kernel serves the flow
    /// or answers with a RST, never a silent drop.
    pub fn on_carrier_packet(&mut self, now: Timestamp, outer_src: IpAddr, inner: &[u8]) -> Verdict {
        let from = match self.members.by_addr(outer_src) {
            Some(id) if id != self.config.local => id,
            _ => return self.drop(DropReason::NotMember),
        };
        let meta = match classify(inner) {
            Ok(m) => m,
            Err(e) => return self.drop(e.into()),
        };
        if !meta.key.dst_is(self.config.vip) {
            return self.drop(DropReason::NotVip);
        }
        if matches!(meta.l4, L4::Icmp { .. }) {
            self.counters.decapsulated += 1;
            return Verdict::Deliver;
        }
        let served = self.served.find(&meta.key);
        // A connection this node does not serve, from an entry that did not know it: on to its
        // server, if this node's directory knows it (see the `recovery` module).
        if served.is_none() && matches!(meta.l4, L4::Tcp(f) if !f.syn) && !self.serves(&meta.key) {
            if let Some(verdict) = self.second_hop(now, from, &meta) {
                return verdict;
            }
        }
        self.counters.decapsulated += 1;
        self.track_served(now, &meta, served);
        if self.offload.is_some() {
            self.offload_now = now;
            self.offer_served_flow(&meta.key, from, meta.is_tcp_syn());
        }
        Verdict::Deliver
    }

    /// Counts a flow served here for another entry (`found`: its handle in `served`, if any).
    fn track_served(&mut self, now: Timestamp, meta: &PacketMeta, found: Option<u32>) {
        let local = self.config.local;
        if let Some(h) = found {
            let next = next_state(self.served.state(h), meta.l4);
            let confirmed = self.served.is_confirmed(h);
            self.served.touch(h, now, next);
            if !confirmed && self.served.is_confirmed(h) && next == FlowState::TcpEstablished {
                self.note_served(&meta.key);
            }
        } else {
            let state = initial_state(meta.l4);
            if state != FlowState::TcpEstablished {
                self.counters.served_new_flows += 1;
            }
            // Only a count of what this node serves: any of it may be forgotten under pressure.
            self.served.insert(now, meta.key, local, PlacedBy::Hash);
        }
    }

    /// Flows this node serves: those it placed on itself as an entry plus those other entries
    /// forwarded to it. This is the load it reports to its peers.
    pub fn served_flows(&self) -> usize {
        self.flows.flows_on(self.config.local) as usize + self.served.len()
    }

    /// Adds a member or updates its address, weight and state (from the control plane). A gone
    /// member holding the address yields it.
    pub fn upsert_member(
        &mut self,
        name: &str,
        addr: IpAddr,
        weight: f64,
        state: MemberState,
    ) -> Result<NodeId, crate::MembersError> {
        // A gone member of another name yields the address; the same name coming back keeps
        // its entry, so that flows still pinned to it (a refuted death) reach it again.
        if self.members.by_addr(addr).and_then(|id| self.members.get(id)).is_some_and(|m| m.name != name) {
            self.members.release_addr_of_gone(addr);
        }
        let id = match self.members.by_name(name) {
            Some(id) => {
                if self.members.get(id).is_some_and(|m| m.addr != addr) {
                    self.members.set_addr(id, addr)?;
                }
                id
            }
            None => {
                let member = Member::new(name, addr, weight);
                // A forgotten member's slot that no flow points to any more is reused, so that
                // churn of names does not grow the table.
                let free =
                    self.members.iter().find(|(id, m)| m.removed && self.flows.flows_on(*id) == 0).map(|(id, _)| id);
                match free {
                    Some(id) => {
                        self.members.reuse(id, member)?;
                        self.forwarded_to[id.index()] = 0;
                        self.placed_to[id.index()] = 0;
                        id
                    }
                    None => {
                        let id = self.members.add(member)?;
                        self.forwarded_to.resize(self.members.len(), 0);
                        self.placed_to.resize(self.members.len(), 0);
                        id
                    }
                }
            }
        };
        if let Some(m) = self.members.get_mut(id) {
            m.weight = weight;
            m.state = state;
            if state.is_gone() {
                m.load = None;
            }
        }
        Ok(id)
    }

    /// Forgets a member: its flows see it gone, its name and address are free.
    pub fn remove_member(&mut self, name: &str) {
        if let Some(id) = self.members.by_name(name).filter(|&id| id != self.config.local) {
            self.members.remove(id);
            // A member that later takes this slot starts ineligible for offloading.
            self.set_offload_eligible(id, false);
        }
    }

    /// Applies a change the cluster state machine made.
    pub fn apply(&mut self, now: Timestamp, update: &crate::Update) -> Result<(), crate::MembersError> {
        match update {
            crate::Update::Member { name, underlay, weight, state, site } => {
                let id = self.upsert_member(name, *underlay, *weight, *state)?;
                if let Some(m) = self.members.get_mut(id) {
                    if m.site != *site {
                        m.site.clone_from(site);
                    }
                }
            }
            crate::Update::Removed { name } => {
                if let Some(id) = self.members.by_name(name).filter(|&id| id != self.config.local) {
                    self.recovery_forget(id);
                }
                self.remove_member(name);
            }
            crate::Update::Flow { from, msg } => self.apply_flow_message(now, from, msg),
            crate::Update::Load { name, load } => {
                if let Some(id) = self.members.by_name(name) {
                    let report = LoadReport {
                        served_flows: load.served_flows,
                        new_flows_per_sec: load.new_flows_per_sec,
                        cpu: load.cpu,
                        received: now,
                    };
                    // A member whose app fails its health checks takes no new flows, as if drained.
                    self.set_load(id, report, f64::from(load.weight), load.draining || load.app_unhealthy);
                }
            }
        }
        Ok(())
    }

    /// Records a member's load vector received at `now`.
    pub fn set_load(&mut self, id: NodeId, report: LoadReport, weight: f64, draining: bool) {
        if let Some(m) = self.members.get_mut(id) {
            m.load = Some(report);
            m.weight = weight;
            if draining && m.state == MemberState::Alive {
                m.state = MemberState::Draining;
            } else if !draining && m.state == MemberState::Draining {
                m.state = MemberState::Alive;
            }
        }
    }

    /// This node's own capacity weight changed (a reload); 0 takes no new flows.
    pub fn set_local_weight(&mut self, weight: f64) {
        let local = self.config.local;
        if let Some(m) = self.members.get_mut(local) {
            m.weight = weight;
        }
    }

    /// Stops (or resumes) taking new flows on this node; pinned flows finish here.
    pub fn set_draining(&mut self, draining: bool) {
        let local = self.config.local;
        if let Some(m) = self.members.get_mut(local) {
            m.state = if draining { MemberState::Draining } else { MemberState::Alive };
        }
    }

    /// When [`Node::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.flows.next_expiry()
    }

    /// Expires idle flows.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let n = self.flows.expire(now);
        self.counters.flows_expired += n as u64;
        self.served.expire(now);
        self.recovery_tick(now);
    }

    fn max_mss(&self) -> u16 {
        // IPv4 + TCP headers without options; options shrink the payload further by themselves.
        self.config.tun_mtu.saturating_sub(40)
    }

    /// The node serving `meta`'s flow, creating the flow if it is new.
    fn flow_target(&mut self, now: Timestamp, meta: &PacketMeta) -> Result<NodeId, DropReason> {
        let key = &meta.key;
        if let Some(h) = self.flows.find(key) {
            let next = next_state(self.flows.state(h), meta.l4);
            let confirmed = self.flows.is_confirmed(h);
            self.flows.touch(h, now, next);
            let target = self.flows.target(h);
            if target == self.config.local
                && !confirmed
                && self.flows.is_confirmed(h)
                && next == FlowState::TcpEstablished
            {
                self.note_served(key);
            }
            let state = self.members.get(target).map(|m| m.state);
            // A SYN on a tracked tuple is a new connection (the client reused its port): it
            // is placed anew when its node would get no new flow now (dead, draining, of
            // weight 0, or silent), like any new connection.
            if meta.is_tcp_syn() && !self.takes_new_flows(now, target) {
                let target = self.place(now, key, How::Policy);
                self.flows.retarget(h, target);
                return Ok(target);
            }
            // A member that left on purpose (its daemon stopped) keeps its TCP flows: its kernel
            // still holds the connections, and its next daemon takes their packets again
            // (meanwhile they are lost, and resent). A dead member's flows, one the cluster has
            // forgotten, and UDP flows of any gone member go elsewhere.
            let udp = !matches!(meta.l4, L4::Tcp(_));
            if state == Some(MemberState::Dead) || (udp && state.is_some_and(MemberState::is_gone)) {
                return Ok(self.rescue(now, h, meta));
            }
            return Ok(target);
        }
        self.new_flow(now, meta)
    }

    /// The first packet this entry sees of a flow: placed, and tracked as unconfirmed when the
    /// table takes it. Under pressure (see [`FlowTable`]) new flows are placed by consistent
    /// hash, so that whether or not they are tracked, their later packets land on the same node.
    fn new_flow(&mut self, now: Timestamp, meta: &PacketMeta) -> Result<NodeId, DropReason> {
        let key = &meta.key;
        let starts = match initial_state(meta.l4) {
            FlowState::TcpHandshake | FlowState::Udp => true,
            FlowState::TcpEstablished => false,
            FlowState::TcpClosing => {
                // The FIN or RST of a connection this entry never saw: it goes where the rest of
                // that connection would, and nothing is left worth pinning.
                self.counters.flows_untracked += 1;
                return self.recover_at_entry(now, key);
            }
        };
        let room = self.flows.has_room();
        if !room {
            self.hash_udp_until = now.saturating_add(self.config.flows.udp_idle);
        }
        let how = if !starts {
            How::HashFallback
        } else if !room || (key.proto != IPPROTO_TCP && now < self.hash_udp_until) {
            How::HashUnderPressure
        } else {
            How::Policy
        };
        // A connection this entry never saw start: to its server, found through its home.
        let target =
            if how == How::HashFallback { self.recover_at_entry(now, key)? } else { self.place(now, key, how) };
        let placed = if how == How::Policy { PlacedBy::Policy } else { PlacedBy::Hash };
        match self.flows.insert(now, *key, target, placed) {
            Some(ins) => {
                self.counters.flows_created += 1;
                if ins.evicted.is_some() {
                    self.counters.flows_evicted += 1;
                }
            }
            None => self.counters.flows_untracked += 1,
        }
        Ok(target)
    }

    /// Where an ICMP error about a server's packet of `flow` goes: to the node serving the flow.
    /// A flow pinned to a dead member is served by none (its next packet is reset here or placed
    /// anew), so the local kernel takes the error; a flow not tracked is served where
    /// consistent hashing places its packets.
    fn icmp_error_target(&mut self, now: Timestamp, flow: &FlowKey) -> NodeId {
        let local = self.config.local;
        if let Some(h) = self.flows.find(flow) {
            let target = self.flows.target(h);
            return match self.members.get(target) {
                Some(m) if m.state != MemberState::Dead => target,
                _ => local,
            };
        }
        self.fill_candidates(now);
        match consistent_hash(flow, &self.candidates) {
            Placement::Chosen(id) => id,
            Placement::NoCandidate => local,
        }
    }

    /// A packet of a flow pinned to a member that died.
    fn rescue(&mut self, now: Timestamp, h: u32, meta: &PacketMeta) -> NodeId {
        let target = match (meta.l4, self.config.on_failure) {
            (L4::Tcp(_), FailurePolicy::Reset) => {
                self.counters.flows_reset += 1;
                self.config.local
            }
            _ => {
                self.counters.flows_replaced += 1;
                self.place(now, &meta.key, How::Policy)
            }
        };
        self.flows.retarget(h, target);
        target
    }

    /// The members as the policy sees them, into `self.candidates`.
    fn fill_candidates(&mut self, now: Timestamp) {
        self.candidates.clear();
        let fresh_since = now.saturating_sub(self.config.load_stale_after);
        for (id, m) in self.members.iter() {
            let pinned = f64::from(self.flows.flows_on(id));
            let load = match (&m.load, id == self.config.local) {
                (_, true) => self.served_flows() as f64,
                (Some(r), false) => pinned.max(f64::from(r.served_flows)),
                (None, false) => pinned,
            };
            self.candidates.push(Candidate {
                id,
                weight: m.weight,
                load,
                eligible: m.state.takes_new_flows() && load_fresh(&self.config, id, m, fresh_since),
                name_hash: m.name_hash,
            });
        }
    }

    /// Whether the policy may place a new flow on `id` at `now` (what [`Candidate::takes_flows`]
    /// says of it): alive, of a weight above 0, and, a peer, with fresh load reports.
    fn takes_new_flows(&self, now: Timestamp, id: NodeId) -> bool {
        let fresh_since = now.saturating_sub(self.config.load_stale_after);
        self.members.get(id).is_some_and(|m| {
            m.state.takes_new_flows() && m.weight > 0.0 && load_fresh(&self.config, id, m, fresh_since)
        })
    }

    /// The second chance of an entry that takes no new flows itself (weight 0, or draining)
    /// when its policy found no peer either: rather than serve what its operator said it must
    /// not, it places the flow on a peer that is only in doubt: suspect, or alive with a late
    /// load report. Across a WAN a lost probe or a late vector is far more often the network
    /// than the peer, and a suspect that is dead is found so within seconds (its flows are then
    /// rescued). By consistent hash, since no fresh load ranks them; in the entry's own site when
    /// that has one, and only there under `sites.mode = "strict"`. With none in doubt either,
    /// the entry serves (the last resort).
    fn place_on_doubtful(&mut self, now: Timestamp, key: &FlowKey) -> Placement {
        self.fill_candidates(now);
        let strict = self.sites.policy.mode == crate::sites::SiteMode::Strict;
        let own = self.members.get(self.config.local).map_or("", |m| m.site.as_str());
        for c in &mut self.candidates {
            // Not taking new flows (so not passed over by the site rules), but alive or suspect.
            let in_doubt = !c.eligible
                && self.members.get(c.id).is_some_and(|m| {
                    !m.is_removed()
                        && matches!(m.state, MemberState::Alive | MemberState::Suspect)
                        && (!strict || m.site == own)
                });
            c.eligible = in_doubt;
        }
        self.restrict_to_own_site_if_it_takes_flows();
        let placement = consistent_hash(key, &self.candidates);
        if matches!(placement, Placement::Chosen(_)) {
            self.counters.placed_on_doubtful += 1;
        }
        placement
    }

    fn place(&mut self, now: Timestamp, key: &FlowKey, how: How) -> NodeId {
        self.fill_candidates(now);
        let local = self.config.local.index();
        let placement = match how {
            How::Policy => match self.restrict_to_site() {
                sites::SiteChoice::OneSite => self.config.policy.place(key, &self.candidates, local, &mut self.rng),
                sites::SiteChoice::Restricted { cross_site } => {
                    self.counters.placed_cross_site += u64::from(cross_site);
                    self.config.policy.place(key, &self.candidates, local, &mut self.rng)
                }
                sites::SiteChoice::Nowhere => Placement::NoCandidate,
            },
            How::HashFallback => {
                self.counters.placed_by_hash_fallback += 1;
                consistent_hash(key, &self.candidates)
            }
            How::HashUnderPressure => {
                self.counters.placed_by_hash_under_pressure += 1;
                // A flood that pushes the table into hashing must not be spread over the WAN.
                self.restrict_to_own_site_if_it_takes_flows();
                consistent_hash(key, &self.candidates)
            }
        };
        let placement = match placement {
            Placement::NoCandidate if !self.candidates.get(local).is_some_and(Candidate::takes_flows) => {
                self.place_on_doubtful(now, key)
            }
            p => p,
        };
        let target = match placement {
            Placement::Chosen(id) => id,
            Placement::NoCandidate => self.config.local,
        };
        if let Some(n) = self.placed_to.get_mut(target.index()) {
            *n += 1;
        }
        if target == self.config.local {
            self.counters.placed_local += 1;
            self.counters.served_new_flows += 1;
        } else {
            self.counters.placed_peer += 1;
        }
        target
    }
}

const IPPROTO_TCP: u8 = 6;

/// How a flow is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Policy,
    /// A packet of a flow that began unseen (not a SYN): consistent hash, as every node would.
    HashFallback,
    /// A new flow while the flow table is under pressure: consistent hash, so that its later
    /// packets find the same node whether or not it is tracked.
    HashUnderPressure,
}

/// What the first packet seen of a flow says about it.
fn initial_state(l4: L4) -> FlowState {
    match l4 {
        L4::Tcp(f) if f.syn && !f.ack => FlowState::TcpHandshake,
        L4::Tcp(f) if f.fin || f.rst => FlowState::TcpClosing,
        L4::Tcp(_) => FlowState::TcpEstablished,
        _ => FlowState::Udp,
    }
}

/// Whether member `id`'s load reports allow it new flows: this node's own always do; a peer's
/// latest must have arrived at or after `fresh_since` (without one, only when the configuration
/// does not require them).
fn load_fresh(config: &NodeConfig, id: NodeId, m: &Member, fresh_since: Timestamp) -> bool {
    if id == config.local {
        return true;
    }
    m.load.as_ref().map_or(!config.require_load, |r| r.received >= fresh_since)
}

/// The TCP state machine as seen from the client's side of the connection only (replies
/// bypass the entry, so it never sees the server's packets).
fn next_state(current: FlowState, l4: L4) -> FlowState {
    match l4 {
        L4::Tcp(f) if f.rst || f.fin => FlowState::TcpClosing,
        // A new SYN on a lingering tuple starts a new connection to the same node.
        L4::Tcp(f) if f.syn && !f.ack => FlowState::TcpHandshake,
        L4::Tcp(_) if current == FlowState::TcpClosing => FlowState::TcpClosing,
        L4::Tcp(_) => FlowState::TcpEstablished,
        _ => current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Member, MemberState};
    use ringlb_wire::build::{tcp_v4, udp_v4};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const VIP: [u8; 4] = [10, 200, 0, 10];
    const CLIENT: [u8; 4] = [10, 78, 0, 100];
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN_ACK: u8 = 0x11;

    pub(super) fn ip(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    fn node(policy: Policy) -> Node {
        node_with(policy, (1..=3).map(|i| Member::new(format!("n{i}"), ip([10, 77, 0, i]), 1.0)))
    }

    /// A node of `members`, the first of them local, placing with `policy`.
    pub(super) fn node_with(policy: Policy, members: impl IntoIterator<Item = Member>) -> Node {
        let members = Members::new(members).unwrap();
        Node::new(
            NodeConfig {
                local: NodeId(0),
                vip: ip(VIP),
                tun_mtu: 1472,
                flows: FlowConfig::default(),
                policy,
                seed: 42,
                on_failure: FailurePolicy::Reset,
                load_stale_after: Duration::from_secs(1),
                require_load: false,
                // Settled from the first tick: these tests are about placement.
                recovery: RecoveryConfig {
                    settle: Duration::ZERO,
                    query_grace: Duration::ZERO,
                    ..RecoveryConfig::default()
                },
            },
            members,
        )
    }

    pub(super) fn at(ms: u64) -> Timestamp {
        Timestamp::from_duration(Duration::from_millis(ms))
    }

    fn classify_key(port: u16) -> FlowKey {
        ringlb_wire::classify(&tcp_v4(CLIENT, VIP, port, 80, ACK, &[])).unwrap().key
    }

    pub(super) fn syn(port: u16) -> Vec<u8> {
        tcp_v4(CLIENT, VIP, port, 80, SYN, &[2, 4, 0x05, 0xb4])
    }

    pub(super) fn target(v: Verdict) -> Option<NodeId> {
        match v {
            Verdict::Deliver => Some(NodeId(0)),
            Verdict::Forward { peer, .. } => Some(peer),
            Verdict::Drop(_) => None,
        }
    }

    #[test]
    fn later_packets_follow_the_first() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.1 });
        let mut placed = Vec::new();
        for port in 1000..1030 {
            placed.push(target(n.on_tun_packet(at(0), &mut syn(port))).unwrap());
        }
        assert!(placed.contains(&NodeId(1)) && placed.contains(&NodeId(2)));
        for (i, port) in (1000..1030).enumerate() {
            for flags in [ACK, ACK, FIN_ACK, ACK] {
                let v = n.on_tun_packet(at(10), &mut tcp_v4(CLIENT, VIP, port, 80, flags, &[]));
                assert_eq!(target(v), Some(placed[i]), "port {port} moved");
            }
        }
        assert_eq!(n.counters().flows_created, 30);
    }

    #[test]
    fn forwarded_syns_are_clamped_local_ones_not() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.1 });
        let mut first = syn(1);
        assert_eq!(n.on_tun_packet(at(0), &mut first), Verdict::Deliver);
        assert_eq!(u16::from_be_bytes([first[42], first[43]]), 1460);
        let mut second = syn(2);
        assert!(matches!(n.on_tun_packet(at(0), &mut second), Verdict::Forward { .. }));
        assert_eq!(u16::from_be_bytes([second[42], second[43]]), 1432);
        assert_eq!(n.counters().mss_clamped, 1);
    }

    #[test]
    fn flows_expire_and_closing_lingers() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.1 });
        n.on_tun_packet(at(0), &mut syn(7));
        n.on_tun_packet(at(1), &mut tcp_v4(CLIENT, VIP, 7, 80, ACK, &[]));
        n.on_tun_packet(at(2), &mut tcp_v4(CLIENT, VIP, 7, 80, FIN_ACK, &[]));
        assert_eq!(n.poll_timeout(), Some(at(10_002)));
        n.handle_timeout(at(10_001));
        assert_eq!(n.flows().len(), 1);
        n.handle_timeout(at(10_002));
        assert_eq!(n.flows().len(), 0);
        assert_eq!(n.counters().flows_expired, 1);
    }

    #[test]
    fn unknown_mid_stream_packets_use_the_hash_fallback() {
        let mut a = node(Policy::PowerOfTwo { margin: 0.1 });
        let mut b = node(Policy::ConsistentHash);
        for port in 0..50 {
            let ta = target(a.on_tun_packet(at(0), &mut tcp_v4(CLIENT, VIP, port, 80, ACK, &[])));
            let tb = target(b.on_tun_packet(at(0), &mut tcp_v4(CLIENT, VIP, port, 80, SYN, &[])));
            assert_eq!(ta, tb, "fallback must agree with consistent hashing");
        }
        assert_eq!(a.counters().placed_by_hash_fallback, 50);
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.1 });
        let good = udp_v4(CLIENT, VIP, 5000, 53, b"q");
        let other_dst = udp_v4(CLIENT, [10, 200, 0, 11], 5000, 53, b"q");
        let mut bad_ihl = good.clone();
        bad_ihl[0] = 0x41;
        let cases: Vec<(Vec<u8>, DropReason)> = vec![
            (good[..12].to_vec(), DropReason::Truncated),
            (bad_ihl, DropReason::BadIpHeader),
            (other_dst.clone(), DropReason::NotVip),
        ];
        for (mut pkt, reason) in cases {
            assert_eq!(n.on_tun_packet(at(0), &mut pkt.clone()), Verdict::Drop(reason));
            assert_eq!(n.on_carrier_packet(at(0), ip([10, 77, 0, 2]), &pkt), Verdict::Drop(reason));
            assert_eq!(n.counters().drops(reason), 2);
            pkt.clear();
        }
        assert_eq!(n.on_carrier_packet(at(0), ip([10, 77, 0, 9]), &good), Verdict::Drop(DropReason::NotMember));
        assert_eq!(n.on_carrier_packet(at(0), ip([10, 77, 0, 1]), &good), Verdict::Drop(DropReason::NotMember), "self");
        assert_eq!(n.on_carrier_packet(at(0), ip([10, 77, 0, 3]), &good), Verdict::Deliver);
        assert_eq!(n.counters().decapsulated, 1);
    }

    #[test]
    fn flows_of_a_dead_member_are_reset_or_replaced() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.0 });
        let mut pinned = Vec::new();
        for port in 0..30 {
            let t = target(n.on_tun_packet(at(0), &mut syn(port))).unwrap();
            let u = target(n.on_tun_packet(at(0), &mut udp_v4(CLIENT, VIP, port, 53, b"q"))).unwrap();
            pinned.push((port, t, u));
        }
        n.upsert_member("n3", ip([10, 77, 0, 3]), 1.0, MemberState::Dead).unwrap();
        for (port, t, u) in pinned {
            let t2 = target(n.on_tun_packet(at(1), &mut tcp_v4(CLIENT, VIP, port, 80, ACK, &[]))).unwrap();
            let u2 = target(n.on_tun_packet(at(1), &mut udp_v4(CLIENT, VIP, port, 53, b"q"))).unwrap();
            if t == NodeId(2) {
                assert_eq!(t2, NodeId(0), "tcp flow of the dead node goes to the local kernel, which resets it");
            } else {
                assert_eq!(t2, t, "tcp flows of live nodes stay");
            }
            assert_ne!(u2, NodeId(2), "udp flow re-placed away from the dead node");
            if u != NodeId(2) {
                assert_eq!(u2, u);
            }
        }
        assert!(n.counters().flows_reset > 0 && n.counters().flows_replaced > 0);
        // Views may differ: what a member held dead still sends is delivered (the local kernel
        // serves it or resets it), never dropped in silence ...
        let good = udp_v4(CLIENT, VIP, 1, 53, b"q");
        assert_eq!(n.on_carrier_packet(at(1), ip([10, 77, 0, 3]), &good), Verdict::Deliver);
        // ... until the cluster forgets it; then its address is nobody's.
        n.remove_member("n3");
        assert_eq!(n.on_carrier_packet(at(1), ip([10, 77, 0, 3]), &good), Verdict::Drop(DropReason::NotMember));
    }

    #[test]
    fn a_replacement_takes_a_gone_members_address_and_its_flows_stay_gone() {
        let mut n = node(Policy::ConsistentHash);
        let on_n3: Vec<u16> =
            (0..200).filter(|&p| target(n.on_tun_packet(at(0), &mut syn(p))) == Some(NodeId(2))).collect();
        assert!(!on_n3.is_empty());
        n.upsert_member("n3", ip([10, 77, 0, 3]), 1.0, MemberState::Dead).unwrap();
        // n4 at n3's address: the dead n3 yields it.
        let n4 = n.upsert_member("n4", ip([10, 77, 0, 3]), 1.0, MemberState::Alive).unwrap();
        assert_ne!(n4, NodeId(2), "flows pinned to n3 must not move to n4");
        assert_eq!(n.members().by_addr(ip([10, 77, 0, 3])), Some(n4));
        let t = target(n.on_tun_packet(at(1), &mut tcp_v4(CLIENT, VIP, on_n3[0], 80, ACK, &[])));
        assert_eq!(t, Some(NodeId(0)), "n3's flow is reset, not handed to n4");
        // A live holder does not yield.
        assert!(n.upsert_member("n5", ip([10, 77, 0, 3]), 1.0, MemberState::Alive).is_err());
        // A member declared dead that comes back under its own name keeps its entry.
        n.upsert_member("n2", ip([10, 77, 0, 2]), 1.0, MemberState::Dead).unwrap();
        assert_eq!(n.upsert_member("n2", ip([10, 77, 0, 2]), 1.0, MemberState::Alive), Ok(NodeId(1)));
        // A forgotten member's slot is reused once no flow points to it.
        n.remove_member("n4");
        let n6 = n.upsert_member("n6", ip([10, 77, 0, 6]), 1.0, MemberState::Alive).unwrap();
        assert_eq!(n6, n4, "n4's slot had no flows and is reused");
    }

    #[test]
    fn stale_or_draining_members_take_no_new_flows_and_load_reports_count() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.0 });
        let report =
            |served, at_ms| LoadReport { served_flows: served, new_flows_per_sec: 0.0, cpu: 0.0, received: at(at_ms) };
        // n2 reports fresh; n3 reported long ago: only n1 and n2 take flows.
        n.set_load(NodeId(1), report(0, 5_000), 1.0, false);
        n.set_load(NodeId(2), report(0, 0), 1.0, false);
        for port in 0..40 {
            assert_ne!(target(n.on_tun_packet(at(5_100), &mut syn(port))), Some(NodeId(2)), "stale n3 chosen");
        }
        // n2 says it is busy with other entries' flows: it gets less.
        n.set_load(NodeId(1), report(100, 5_200), 1.0, false);
        n.set_load(NodeId(2), report(0, 5_200), 1.0, false);
        let mut got = [0; 3];
        for port in 100..160 {
            got[target(n.on_tun_packet(at(5_300), &mut syn(port))).unwrap().index()] += 1;
        }
        assert!(got[1] < got[2], "reported load ignored: {got:?}");
        // Draining: no new flows, pinned ones stay.
        n.set_load(NodeId(2), report(0, 5_400), 1.0, true);
        n.set_draining(true);
        for port in 200..230 {
            assert_eq!(target(n.on_tun_packet(at(5_500), &mut syn(port))), Some(NodeId(1)));
        }
        // Pinned flows stay where they are, drained node or not.
        let pinned = n.flows().find(&classify_key(100)).map(|h| n.flows().target(h));
        assert!(pinned.is_some());
        assert_eq!(target(n.on_tun_packet(at(5_500), &mut tcp_v4(CLIENT, VIP, 100, 80, ACK, &[]))), pinned);
    }

    #[test]
    fn a_new_connection_on_a_reused_tuple_goes_only_where_new_flows_may() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.0 });
        let report = |at_ms| LoadReport { served_flows: 0, new_flows_per_sec: 0.0, cpu: 0.0, received: at(at_ms) };
        // Connections placed while every member weighs 1, then closed; they linger in the table.
        let mut pinned = [Vec::new(), Vec::new(), Vec::new()];
        for port in 1..90 {
            let t = target(n.on_tun_packet(at(0), &mut syn(port))).unwrap();
            n.on_tun_packet(at(1), &mut tcp_v4(CLIENT, VIP, port, 80, FIN_ACK, &[]));
            pinned[t.index()].push(port);
        }
        assert!(pinned.iter().all(|p| p.len() >= 3), "too few connections on some member: {pinned:?}");
        // A client that reuses a port for a new connection to a member that takes new flows
        // reaches that member again.
        assert_eq!(target(n.on_tun_packet(at(2), &mut syn(pinned[1][0]))), Some(NodeId(1)));
        // n3 reloaded with weight 0 (its record says so, alive as before); the entry itself too.
        n.upsert_member("n3", ip([10, 77, 0, 3]), 0.0, MemberState::Alive).unwrap();
        n.set_local_weight(0.0);
        for &port in pinned[2].iter().chain(&pinned[0]) {
            let t = target(n.on_tun_packet(at(3), &mut syn(port)));
            assert_eq!(t, Some(NodeId(1)), "port {port}: a new connection for a member of weight 0");
            assert_eq!(target(n.on_tun_packet(at(3), &mut tcp_v4(CLIENT, VIP, port, 80, ACK, &[]))), t);
        }
        // n2's load vectors stop (stale after 1 s): the policy has nobody left, and the entry,
        // of weight 0, sends it to n2 all the same (in doubt beats serving against its weight).
        n.set_load(NodeId(1), report(3), 1.0, false);
        assert_eq!(target(n.on_tun_packet(at(5_000), &mut syn(pinned[1][1]))), Some(NodeId(1)));
        assert_eq!(n.counters().placed_on_doubtful, 1);
        // n2 dead: nobody at all, and the entry serves it itself (the last resort).
        n.upsert_member("n2", ip([10, 77, 0, 2]), 1.0, MemberState::Dead).unwrap();
        assert_eq!(target(n.on_tun_packet(at(5_001), &mut syn(pinned[1][2]))), Some(NodeId(0)));
        assert_eq!(n.counters().placed_on_doubtful, 1);
    }

    /// Rule: an entry that takes no new flows itself (weight 0, or draining) places a new flow
    /// on a peer in doubt (suspect, or its load late) when no peer takes new flows, rather than
    /// serve it; an entry that takes flows serves it, as before. Once a flake: across a lossy WAN
    /// a forward-only entry served 8 of 20 requests itself while its only peer was suspect.
    #[test]
    fn an_entry_that_takes_no_flows_prefers_a_peer_in_doubt_to_serving() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.0 });
        let suspect = |n: &mut Node, i: u8| {
            n.upsert_member(&format!("n{}", i + 1), ip([10, 77, 0, i + 1]), 1.0, MemberState::Suspect).unwrap()
        };
        suspect(&mut n, 1);
        suspect(&mut n, 2);
        // Weight 1: with both peers suspect, it serves every new flow itself.
        for port in 0..50 {
            assert_eq!(target(n.on_tun_packet(at(0), &mut syn(port))), Some(NodeId(0)));
        }
        assert_eq!(n.counters().placed_on_doubtful, 0);
        // Weight 0, or draining: the suspects take them, spread by hash, none served here.
        for (weight, draining, ports) in [(0.0, false, 100..200), (1.0, true, 200..300)] {
            n.set_local_weight(weight);
            n.set_draining(draining);
            let mut got = [0; 3];
            for port in ports {
                got[target(n.on_tun_packet(at(0), &mut syn(port))).unwrap().index()] += 1;
            }
            assert_eq!(got[0], 0, "weight {weight}, draining {draining}: {got:?}");
            assert!(got[1] > 20 && got[2] > 20, "weight {weight}, draining {draining}: {got:?}");
        }
        assert_eq!(n.counters().placed_on_doubtful, 200);
        // One peer alive again: it takes them all; the suspect gets none.
        n.upsert_member("n2", ip([10, 77, 0, 2]), 1.0, MemberState::Alive).unwrap();
        for port in 300..340 {
            assert_eq!(target(n.on_tun_packet(at(0), &mut syn(port))), Some(NodeId(1)));
        }
        assert_eq!(n.counters().placed_on_doubtful, 200);
        // A peer of weight 0, or draining, is not in doubt: it said it takes nothing.
        n.upsert_member("n2", ip([10, 77, 0, 2]), 0.0, MemberState::Alive).unwrap();
        n.upsert_member("n3", ip([10, 77, 0, 3]), 1.0, MemberState::Draining).unwrap();
        for port in 400..420 {
            assert_eq!(target(n.on_tun_packet(at(0), &mut syn(port))), Some(NodeId(0)));
        }
    }

    #[test]
    fn icmp_errors_follow_the_flow_they_quote() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.0 });
        // Place a few flows; find one on a peer.
        let (port, peer) = (1..20)
            .find_map(|p| match n.on_tun_packet(at(0), &mut syn(p)) {
                Verdict::Forward { peer, .. } => Some((p, peer)),
                _ => None,
            })
            .unwrap();
        let mut pkt = icmp_error_about(port);
        assert_eq!(target(n.on_tun_packet(at(1), &mut pkt)), Some(peer), "error not sent to the flow's node");
        // An echo request is answered here.
        pkt[20] = 8;
        assert_eq!(target(n.on_tun_packet(at(1), &mut pkt)), Some(NodeId(0)));
    }

    fn small_table_node(max_flows: usize) -> Node {
        let mut n = node(Policy::PowerOfTwo { margin: 0.1 });
        let flows = FlowConfig { max_flows, unconfirmed_share: 0.25, ..FlowConfig::default() };
        n.flows = FlowTable::new(flows.clone(), 1);
        n.config.flows = flows;
        n
    }

    /// A spoofed source: 172.16.0.0/12, one address per `i`.
    fn spoofed(i: u32) -> [u8; 4] {
        (0xac10_0000 | (i & 0x000f_ffff)).to_be_bytes()
    }

    #[test]
    fn a_syn_flood_evicts_no_established_flow_and_new_flows_stay_consistent() {
        let mut n = small_table_node(100);
        // 30 established connections, spread by the policy, idle from t = 10 ms on.
        let mut pinned = Vec::new();
        for port in 0..30 {
            let t = target(n.on_tun_packet(at(0), &mut syn(port))).unwrap();
            assert_eq!(target(n.on_tun_packet(at(10), &mut tcp_v4(CLIENT, VIP, port, 80, ACK, &[]))), Some(t));
            pinned.push(t);
        }
        assert!(pinned.iter().any(|&t| t != NodeId(0)));
        // 10,000 SYNs, then 10,000 ACKs, from spoofed sources.
        let quota = n.flows().config().unconfirmed_quota();
        for (flags, sources) in [(SYN, 0), (ACK, 500_000)] {
            for i in 0..10_000u32 {
                let port = u16::try_from(i % 60_000).unwrap() + 1024;
                n.on_tun_packet(at(1000), &mut tcp_v4(spoofed(sources + i), VIP, port, 80, flags, &[]));
            }
            assert_eq!((n.flows().len(), n.flows().unconfirmed()), (30 + quota, quota));
        }
        let c = n.counters().clone();
        assert_eq!(c.flows_evicted, 0, "only flows placed by the policy were there to evict");
        assert_eq!(c.flows_untracked, 20_000 - quota as u64);
        assert_eq!(c.placed_by_hash_under_pressure, 10_000 - quota as u64);
        n.flows().check_invariants();
        // Mid-stream packets of unknown flows, placed by hash, replace one another under
        // pressure (the oldest first) once the SYNs placed by the policy have idled out.
        n.handle_timeout(at(31_000));
        for i in 0..1000u32 {
            n.on_tun_packet(at(31_000), &mut tcp_v4(spoofed(i + 700_000), VIP, 9, 80, ACK, &[]));
        }
        assert_eq!(n.counters().flows_evicted, 1000 - quota as u64);
        assert_eq!(n.flows().unconfirmed(), quota);
        // A real client connecting during the flood: its SYN and ACK agree, tracked or not.
        for port in 100..130 {
            let t = target(n.on_tun_packet(at(31_001), &mut syn(port)));
            for flags in [ACK, ACK, FIN_ACK] {
                assert_eq!(target(n.on_tun_packet(at(31_002), &mut tcp_v4(CLIENT, VIP, port, 80, flags, &[]))), t);
            }
        }
        // The idle established connections are where they were.
        for (port, &t) in (0..30).zip(&pinned) {
            let v = n.on_tun_packet(at(32_000), &mut tcp_v4(CLIENT, VIP, port, 80, ACK, &[]));
            assert_eq!(target(v), Some(t), "port {port} moved");
        }
        // When the flood's flows have idled out, new flows go by the policy again; new UDP flows
        // only once a flow placed by hash under pressure would have idled out too.
        n.handle_timeout(at(62_000));
        assert!(n.flows().has_room());
        let before = n.counters().placed_by_hash_under_pressure;
        n.on_tun_packet(at(62_000), &mut syn(200));
        assert_eq!(n.counters().placed_by_hash_under_pressure, before);
        n.on_tun_packet(at(62_000), &mut udp_v4(CLIENT, VIP, 200, 53, b"q"));
        assert_eq!(n.counters().placed_by_hash_under_pressure, before + 1, "udp by hash within udp_idle");
        n.on_tun_packet(at(31_002 + 120_000), &mut udp_v4(CLIENT, VIP, 201, 53, b"q"));
        assert_eq!(n.counters().placed_by_hash_under_pressure, before + 1, "udp by the policy again");
    }

    #[test]
    fn flows_that_began_unseen_wait_for_a_second_packet() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.1 });
        // A mid-stream ACK: tracked, unconfirmed, for the handshake timeout only.
        n.on_tun_packet(at(0), &mut tcp_v4(CLIENT, VIP, 1, 80, ACK, &[]));
        n.on_tun_packet(at(0), &mut tcp_v4(CLIENT, VIP, 2, 80, ACK, &[]));
        assert_eq!(n.flows().unconfirmed(), 2);
        n.on_tun_packet(at(1), &mut tcp_v4(CLIENT, VIP, 2, 80, ACK, &[]));
        assert_eq!(n.flows().unconfirmed(), 1, "the second packet confirms");
        n.handle_timeout(at(30_000));
        assert_eq!(n.flows().find(&classify_key(1)), None, "unconfirmed flows idle out after 30 s");
        assert!(n.flows().find(&classify_key(2)).is_some(), "confirmed ones last 15 min");
        // A FIN or RST of an unknown connection is placed by hash and not tracked.
        for (port, flags) in [(3, FIN_ACK), (4, 0x04)] {
            let v = target(n.on_tun_packet(at(30_001), &mut tcp_v4(CLIENT, VIP, port, 80, flags, &[])));
            let again = target(n.on_tun_packet(at(30_002), &mut tcp_v4(CLIENT, VIP, port, 80, ACK, &[])));
            assert_eq!(v, again);
        }
        assert_eq!(n.counters().flows_untracked, 2);
    }

    /// The router's "fragmentation needed" (MTU 1400) for the reply (VIP -> client) of the
    /// flow from CLIENT's `port`. (The core does not check ICMP checksums; the serving node's
    /// kernel does.)
    fn icmp_error_about(port: u16) -> Vec<u8> {
        let reply = tcp_v4(VIP, CLIENT, 80, port, ACK, &[]);
        let mut icmp_body = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        icmp_body.extend_from_slice(&reply[..28]);
        let mut pkt = ringlb_wire::build::udp_v4([10, 77, 0, 254], VIP, 0, 0, &[]);
        pkt.truncate(20);
        pkt[9] = 1; // ICMP
        pkt.extend_from_slice(&icmp_body);
        let len = u16::try_from(pkt.len()).unwrap();
        pkt[2..4].copy_from_slice(&len.to_be_bytes());
        ringlb_wire::build::fix_ipv4_checksum(&mut pkt);
        pkt
    }

    fn kill(n: &mut Node, id: NodeId) {
        if let Some(m) = n.members.get_mut(id) {
            m.state = MemberState::Dead;
        }
    }

    #[test]
    fn icmp_errors_about_a_dead_members_flow_stay_here_and_untracked_flows_follow_the_hash() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.0 });
        let on_n3: Vec<u16> =
            (1..60).filter(|&p| target(n.on_tun_packet(at(0), &mut syn(p))) == Some(NodeId(2))).collect();
        assert!(!on_n3.is_empty());
        assert_eq!(target(n.on_tun_packet(at(1), &mut icmp_error_about(on_n3[0]))), Some(NodeId(2)));
        kill(&mut n, NodeId(2));
        assert_eq!(
            target(n.on_tun_packet(at(2), &mut icmp_error_about(on_n3[0]))),
            Some(NodeId(0)),
            "error forwarded to a dead member"
        );
        // Once the flow is rescued (replaced elsewhere), its errors follow it there.
        n.config.on_failure = FailurePolicy::Replace;
        let moved = target(n.on_tun_packet(at(3), &mut tcp_v4(CLIENT, VIP, on_n3[1], 80, ACK, &[])));
        assert_ne!(moved, Some(NodeId(2)));
        assert_eq!(target(n.on_tun_packet(at(4), &mut icmp_error_about(on_n3[1]))), moved);
        // An untracked flow's errors go where the hash places its packets.
        let mut hash = node(Policy::ConsistentHash);
        kill(&mut hash, NodeId(2));
        for port in 1000..1030 {
            let want = target(hash.on_tun_packet(at(5), &mut syn(port)));
            assert_eq!(target(n.on_tun_packet(at(5), &mut icmp_error_about(port))), want);
        }
    }

    #[test]
    fn dead_peers_get_no_new_flows() {
        let mut n = node(Policy::PowerOfTwo { margin: 0.0 });
        if let Some(m) = n.members.get_mut(NodeId(2)) {
            m.state = MemberState::Dead;
        }
        for port in 0..100 {
            assert_ne!(target(n.on_tun_packet(at(0), &mut syn(port))), Some(NodeId(2)));
        }
    }
}
