//! Which flows a kernel fast path carries (the IO layer's `ringlb_fastpath`), and how what it
//! did flows back into the tables.
//!
//! The rules, all here so that the IO layer only carries them out:
//! - A flow is offered to the fast path once it has *settled* (confirmed, and established TCP
//!   or UDP), or earlier, at its first packet, while the fast path's table is less than half
//!   full and the flow table has room: a first datagram anywhere, and a SYN on an entry that
//!   forwards the connection. A TCP connection served here (by an entry itself, or by a server
//!   for an entry) waits until settled: its handshake completes in the kernel by the daemon's
//!   path first (see `offerable` for the kernel race this avoids). The first packet always
//!   takes the daemon's path, where placement, MSS clamping, spoofing quotas and flow recovery
//!   happen; then a short connection's other packets (the handshake's ACK, the request and the
//!   close) bypass the entry's daemon. A spoofed first packet costs a table entry, so the
//!   early offer stops at half, and idle flows are withdrawn when the table is nearly full
//!   (see [`PRESSURE`]).
//! - Only to or from members whose pinned flows still flow (alive, suspect, draining) and that are
//!   marked eligible (the IO layer marks a member
//!   ineligible while the carrier to it is sealed: the fast path sends plaintext only).
//! - The fast path never creates a flow and never decides one: it reports, per flow, packets,
//!   bytes, the time of the last packet and whether it carried a FIN or RST.
//!   [`Node::reconcile_offload`] moves the flow on as the daemon would have for those packets
//!   (a forwarded connection in its handshake is established, one that carried a FIN or RST is
//!   closing),
//!   adds them to the counters and touches the flow, so idle timeouts, load (flows served) and
//!   flow recovery stay true; then it withdraws every flow the tables no longer back as they
//!   were offloaded (gone, expired, closing, pinned elsewhere, its member not alive or no longer
//!   eligible). A flow withdrawn takes the daemon's path again, and is offered again if it still
//!   qualifies.
//! - The fast path leaves every SYN to the daemon. A SYN on an offloaded tuple (the client
//!   reused its port) withdraws the flow at once: the new connection may be placed elsewhere,
//!   and a FIN the kernel carried belongs to the old one.
//!
//! The IO layer must reconcile well within the shortest idle timeout of a settled flow (the
//! daemon does every second): a flow whose packets all go through the kernel is otherwise
//! expired although busy.

use std::net::IpAddr;
use std::time::Duration;

use hashbrown::{HashMap, HashSet};
use ringlb_wire::FlowKey;

use super::Node;
use crate::{FlowState, MemberState, NodeId, Timestamp};

/// What the fast path does with an offloaded flow's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offloaded {
    /// This entry serves the flow itself: deliver locally.
    Local,
    /// This entry forwards the flow to `peer` (its underlay address `addr`).
    Forward { peer: NodeId, addr: IpAddr, flow_hash: u64 },
    /// This node serves the flow for the entry `entry` (its underlay address `from`).
    Served { entry: NodeId, from: IpAddr },
}

/// A change for the IO layer to make in the fast path's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadOp {
    Install(FlowKey, Offloaded),
    Remove(FlowKey),
}

/// What the fast path did with one flow since it was installed (running totals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadUsage {
    pub key: FlowKey,
    pub packets: u64,
    pub bytes: u64,
    /// When its last packet went through (`None`: none yet).
    pub last_seen: Option<Timestamp>,
    /// It carried a FIN or RST of the flow.
    pub closed: bool,
}

/// Packets the fast path carried, by what it did (already in the totals below).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OffloadCounters {
    /// Flows offloaded now.
    pub flows: usize,
    pub installed: u64,
    pub withdrawn: u64,
    /// Flows not offloaded because the fast path's table was full.
    pub refused_full: u64,
    pub local_packets: u64,
    pub forwarded_packets: u64,
    pub decapsulated_packets: u64,
    pub bytes: u64,
}

#[derive(Debug)]
struct Installed {
    how: Offloaded,
    packets: u64,
    bytes: u64,
    /// When it was installed or last carried a packet in the fast path.
    active: Timestamp,
    /// Withdrawn because a new connection reuses the tuple: a FIN or RST the kernel carried
    /// was the old connection's.
    reopened: bool,
}

/// While the fast path's table is this full (of `max_flows`), flows it has carried nothing for
/// [`IDLE_UNDER_PRESSURE`] are withdrawn at each reconciliation: two spoofed packets settle a
/// made-up flow, and such flows must not keep real ones out of a full table.
const PRESSURE: f64 = 0.9;
const IDLE_UNDER_PRESSURE: Duration = Duration::from_secs(2);
/// Flows are offered at their first packet only while the table is less full than this; a
/// flood of made-up first packets then fills half of it at most, and real flows still get the
/// rest once they settle.
const EARLY_BELOW: f64 = 0.5;

#[derive(Debug)]
pub(super) struct Offload {
    max_flows: usize,
    /// By member index: may its flows be offloaded?
    eligible: Vec<bool>,
    installed: HashMap<FlowKey, Installed>,
    /// Flows withdrawn whose last usage the IO layer has not reported yet, by key in the order
    /// of their removals (a tuple may be withdrawn, offered again and withdrawn again before
    /// the IO layer carries out the first removal: each report belongs to its own record)
    /// ([`Node::offload_removed`]); cleared at each reconciliation.
    withdrawn: HashMap<FlowKey, Vec<Installed>>,
    /// Flows refused since the last reconciliation (the table full), so that each counts once.
    refused: HashSet<FlowKey>,
    ops: Vec<OffloadOp>,
    counters: OffloadCounters,
}

/// Most refused flows remembered between two reconciliations (beyond, refusals are not counted).
const MAX_REFUSED_TRACKED: usize = 65_536;

impl Offload {
    fn withdraw(&mut self, key: &FlowKey) {
        if let Some(inst) = self.installed.remove(key) {
            self.withdrawn.entry(*key).or_default().push(inst);
            self.ops.push(OffloadOp::Remove(*key));
            self.counters.withdrawn += 1;
        }
    }
}

/// Whether a member's pinned flows still flow: alive, suspect (kept until confirmed dead) or
/// draining (serves its flows to the end, and as an entry still forwards them). Not dead or left.
fn carries(m: &crate::Member) -> bool {
    matches!(m.state, MemberState::Alive | MemberState::Suspect | MemberState::Draining)
}

fn settled(state: FlowState) -> bool {
    matches!(state, FlowState::TcpEstablished | FlowState::Udp)
}

/// Whether an offloaded flow may stay in the fast path in this state: not once it closes.
fn open(state: FlowState) -> bool {
    state != FlowState::TcpClosing
}

/// Whether a flow in this state may be offered: settled, or (`early`) at its start.
/// `delivers`: this node hands the flow's packets to its own kernel (served here, as an entry or
/// for one). A TCP connection is then offered only once settled: its handshake must complete in
/// the kernel by the daemon's path first. Otherwise the handshake's last ACK (sent from the
/// CPU where the daemon delivered the SYN) and the client's first data (from the client's own
/// CPU) reach the kernel on two CPUs at once, and a lookup that races with the kernel turning
/// the half-open connection into a full one finds only the listener, which answers RST (52
/// resets in 690,000 connections served locally in the lab, none in 1,060,000 once settled; a
/// NIC's receive hashing keeps a flow on one CPU, veth pairs do not).
fn offerable(state: FlowState, confirmed: bool, early: bool, delivers: bool) -> bool {
    let start = match state {
        FlowState::Udp => true,
        FlowState::TcpHandshake => !delivers,
        _ => false,
    };
    (confirmed && settled(state)) || (early && start)
}

impl Node {
    /// Turns offloading on: from now on flows are offered (see `offerable`) to a fast path that
    /// holds at most `max_flows`. Every member starts ineligible; see [`Node::set_offload_eligible`].
    pub fn enable_offload(&mut self, max_flows: usize) {
        self.offload = Some(Offload {
            max_flows,
            eligible: Vec::new(),
            installed: HashMap::new(),
            withdrawn: HashMap::new(),
            refused: HashSet::new(),
            ops: Vec::new(),
            counters: OffloadCounters::default(),
        });
    }

    /// Whether flows to or from `member` may be offloaded (the fast path carries plaintext only:
    /// the IO layer says no while the carrier to the member is sealed). This node itself is
    /// always eligible. Withdrawals take effect at the next reconciliation.
    pub fn set_offload_eligible(&mut self, member: NodeId, eligible: bool) {
        if let Some(o) = &mut self.offload {
            let i = member.index();
            if o.eligible.len() <= i {
                o.eligible.resize(i + 1, false);
            }
            o.eligible[i] = eligible;
        }
    }

    /// The changes the fast path's table needs, oldest first (moved into `out`).
    pub fn drain_offload_ops(&mut self, out: &mut Vec<OffloadOp>) {
        if let Some(o) = &mut self.offload {
            out.append(&mut o.ops);
        }
    }

    pub fn offload_counters(&self) -> Option<OffloadCounters> {
        self.offload.as_ref().map(|o| OffloadCounters { flows: o.installed.len(), ..o.counters })
    }

    /// Whether `member`'s flows may be offloaded (to it, or from it as their entry).
    fn offloadable(&self, member: NodeId) -> bool {
        let Some(o) = &self.offload else { return false };
        if member == self.config.local {
            return true;
        }
        o.eligible.get(member.index()).copied().unwrap_or(false) && self.members.get(member).is_some_and(carries)
    }

    /// Whether a flow may be offered at its first packet now (see [`EARLY_BELOW`]).
    fn early(&self, o: &Offload, table: &crate::FlowTable) -> bool {
        #[allow(clippy::cast_precision_loss)]
        let below = (o.installed.len() as f64) < o.max_flows as f64 * EARLY_BELOW;
        below && table.has_room()
    }

    /// After a TUN packet of `key`'s flow (`syn`: a SYN): offers the flow if it qualifies now
    /// (see `offerable`), or withdraws it at once if the packet changed what backs it. Packets
    /// of an offloaded flow reach the daemon only when the fast path leaves them to it (SYN,
    /// too big), and a SYN on a reused tuple may have pinned the flow elsewhere: its next
    /// packets must not follow the old entry until the next reconciliation.
    pub(super) fn offer_entry_flow(&mut self, key: &FlowKey, flow_hash: u64, syn: bool) {
        let Some(o) = &self.offload else { return };
        if o.installed.contains_key(key) && !self.withdraw_if_changed(key, None, syn) {
            return;
        }
        let Some(o) = &self.offload else { return };
        let Some(h) = self.flows.find(key) else { return };
        let target = self.flows.target(h);
        let local = target == self.config.local;
        if !offerable(self.flows.state(h), self.flows.is_confirmed(h), self.early(o, &self.flows), local) {
            return;
        }
        if !self.offloadable(target) {
            return;
        }
        let how = if local {
            Offloaded::Local
        } else {
            match self.members.get(target) {
                Some(m) => Offloaded::Forward { peer: target, addr: m.addr, flow_hash },
                None => return,
            }
        };
        self.install(*key, how);
    }

    /// After a carrier packet of `key`'s flow from the entry `from` (`syn`: a SYN): offers the
    /// flow if it qualifies now (see `offerable`), or withdraws it at once if no longer backed
    /// (as for entries).
    pub(super) fn offer_served_flow(&mut self, key: &FlowKey, from: NodeId, syn: bool) {
        let Some(o) = &self.offload else { return };
        if o.installed.contains_key(key) && !self.withdraw_if_changed(key, Some(from), syn) {
            return;
        }
        let Some(o) = &self.offload else { return };
        let Some(h) = self.served.find(key) else { return };
        let early = self.early(o, &self.served);
        if !offerable(self.served.state(h), self.served.is_confirmed(h), early, true) || !self.offloadable(from) {
            return;
        }
        let Some(addr) = self.members.get(from).map(|m| m.addr) else { return };
        self.install(*key, Offloaded::Served { entry: from, from: addr });
    }

    /// A packet of an offloaded flow reached the daemon (`from`: the entry it came from, for a
    /// flow served here): withdrawn at once if it starts a new connection on the tuple (`syn`),
    /// if another entry sends the flow now (ECMP moved it, or a new layer-2 owner: the program
    /// would pass all its packets to the daemon; withdrawn, it is offered again for the new
    /// entry), or if the tables no longer back it as offloaded. Returns whether the caller is to
    /// offer it again at once, as it now stands: after a SYN (a new connection forwarded, to the
    /// same node or another, goes back into the fast path with a fresh kernel entry; one served
    /// here once it settles). A flow withdrawn for another reason is offered again by its next
    /// packet.
    fn withdraw_if_changed(&mut self, key: &FlowKey, from: Option<NodeId>, syn: bool) -> bool {
        let Some(o) = &self.offload else { return false };
        let Some(inst) = o.installed.get(key) else { return false };
        let moved = matches!((inst.how, from), (Offloaded::Served { entry, .. }, Some(from)) if entry != from);
        if !syn && !moved && self.still_backed(key, inst.how, o) {
            return false;
        }
        let Some(o) = &mut self.offload else { return false };
        o.withdraw(key);
        if syn {
            if let Some(w) = o.withdrawn.get_mut(key).and_then(|w| w.last_mut()) {
                w.reopened = true;
            }
        }
        syn
    }

    fn install(&mut self, key: FlowKey, how: Offloaded) {
        let now = self.offload_now;
        let Some(o) = &mut self.offload else { return };
        if o.installed.len() >= o.max_flows {
            if o.refused.len() < MAX_REFUSED_TRACKED && o.refused.insert(key) {
                o.counters.refused_full += 1;
            }
            return;
        }
        o.installed.insert(key, Installed { how, packets: 0, bytes: 0, active: now, reopened: false });
        o.ops.push(OffloadOp::Install(key, how));
        o.counters.installed += 1;
    }

    /// The IO layer could not install `key` (the kernel's table refused it): the flow stays on
    /// the daemon's path and is offered again by its next packet there.
    pub fn offload_failed(&mut self, key: &FlowKey) {
        if let Some(o) = &mut self.offload {
            o.installed.remove(key);
        }
    }

    /// What a withdrawn flow did in the fast path until it was removed there (the IO layer
    /// reads it as it removes the entry): a short flow may begin and end between two
    /// reconciliations.
    pub fn offload_removed(&mut self, now: Timestamp, usage: &OffloadUsage) {
        let Some(mut o) = self.offload.take() else { return };
        if let Some(records) = o.withdrawn.get_mut(&usage.key) {
            let mut inst = records.remove(0);
            if records.is_empty() {
                o.withdrawn.remove(&usage.key);
            }
            self.credit(&mut o, &mut inst, usage, now);
        }
        self.offload = Some(o);
    }

    /// Adds what the fast path did for one flow since last time to the counters, and moves the
    /// flow on and touches it as the daemon would have for those packets.
    fn credit(&mut self, o: &mut Offload, inst: &mut Installed, u: &OffloadUsage, now: Timestamp) {
        let packets = u.packets.saturating_sub(inst.packets);
        let bytes = u.bytes.saturating_sub(inst.bytes);
        inst.packets = inst.packets.max(u.packets);
        inst.bytes = inst.bytes.max(u.bytes);
        if packets == 0 {
            return;
        }
        // A record withdrawn by a new connection's SYN: what it carried was the old
        // connection's, counted but not moving the new one on.
        let closed = u.closed && !inst.reopened;
        inst.active = now;
        o.counters.bytes += bytes;
        let table = match inst.how {
            Offloaded::Local => {
                o.counters.local_packets += packets;
                &mut self.flows
            }
            Offloaded::Forward { peer, .. } => {
                o.counters.forwarded_packets += packets;
                if let Some(n) = self.forwarded_to.get_mut(peer.index()) {
                    *n += packets;
                }
                &mut self.flows
            }
            Offloaded::Served { .. } => {
                o.counters.decapsulated_packets += packets;
                &mut self.served
            }
        };
        // Touched now, not at the kernel's last packet: the table's lists are ordered by last
        // touch, and a flow lives at most one reconciliation longer for it. The program
        // carries no SYN, so what it carried of a connection in its handshake completed it
        // (only a forwarded one is offered in its handshake, and the entry notes no flow it
        // forwards for flow recovery: its server does, which offloads it once settled).
        let Some(h) = table.find(&u.key) else { return };
        let state = match table.state(h) {
            state if inst.reopened => state,
            FlowState::TcpHandshake | FlowState::TcpEstablished if closed => FlowState::TcpClosing,
            FlowState::TcpHandshake => FlowState::TcpEstablished,
            state => state,
        };
        table.touch(h, now, state);
    }

    /// Takes in what the fast path did (`usage`: its running totals per flow, read at `now`),
    /// then withdraws the flows the tables no longer back. See the module documentation.
    pub fn reconcile_offload(&mut self, now: Timestamp, usage: &[OffloadUsage]) {
        let Some(mut o) = self.offload.take() else { return };
        o.refused.clear();
        o.withdrawn.clear();
        for u in usage {
            let Some(mut inst) = o.installed.remove(&u.key) else {
                // In the kernel's table but not the core's (a delete that failed): it would
                // steer packets nobody accounts for.
                o.ops.push(OffloadOp::Remove(u.key));
                continue;
            };
            self.credit(&mut o, &mut inst, u, now);
            o.installed.insert(u.key, inst);
        }
        #[allow(clippy::cast_precision_loss)]
        let pressed = o.installed.len() as f64 >= o.max_flows as f64 * PRESSURE;
        let mut gone = Vec::new();
        for (key, inst) in &o.installed {
            let idle = pressed && now.saturating_since(inst.active) >= IDLE_UNDER_PRESSURE;
            if idle || !self.still_backed(key, inst.how, &o) {
                gone.push(*key);
            }
        }
        for key in gone {
            o.withdraw(&key);
        }
        self.offload = Some(o);
    }

    /// Whether the tables still back an offloaded flow as it was offloaded.
    fn still_backed(&self, key: &FlowKey, how: Offloaded, o: &Offload) -> bool {
        let eligible = |m: NodeId| {
            m == self.config.local
                || (o.eligible.get(m.index()).copied().unwrap_or(false) && self.members.get(m).is_some_and(carries))
        };
        let (table, pinned) = match how {
            Offloaded::Local => (&self.flows, Some(self.config.local)),
            Offloaded::Forward { peer, addr, .. } => {
                if self.members.get(peer).map(|m| m.addr) != Some(addr) {
                    return false;
                }
                (&self.flows, Some(peer))
            }
            Offloaded::Served { entry, from } => {
                if !eligible(entry) || self.members.get(entry).map(|m| m.addr) != Some(from) {
                    return false;
                }
                (&self.served, None)
            }
        };
        let Some(h) = table.find(key) else { return false };
        if !open(table.state(h)) {
            return false;
        }
        match pinned {
            Some(target) => table.target(h) == target && eligible(target),
            None => true,
        }
    }
}
