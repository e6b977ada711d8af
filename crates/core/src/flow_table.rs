//! The flow table: which node serves each live connection.
//!
//! Layout: a slab of [`Slot`]s, a `HashTable<u32>` of slot indices keyed by the 5-tuple, and
//! one intrusive doubly-linked list per [`List`] (a state and a standing), ordered by last
//! activity. Because every list has a single idle timeout, the head of each list is always its
//! next flow to expire, and the oldest evictable flow is one of two heads. Lookups, touches,
//! inserts, evictions and each expiry are O(1); nothing is allocated per packet once the slab
//! has grown to the working set.
//!
//! **Unconfirmed flows.** The entry never sees replies (they bypass it), so a spoofed packet
//! looks like the first packet of a real flow. Every flow therefore enters *unconfirmed* (a
//! SYN, a first datagram, or a mid-stream packet of a connection this entry did not see begin)
//! and is *confirmed* by a later packet (any but a repeated SYN). Unconfirmed flows may hold at
//! most [`FlowConfig::unconfirmed_share`] of the table.
//!
//! **Pressure.** When that quota or the whole table is full, an insert may evict only an
//! unconfirmed flow that was placed by consistent hash (the oldest): forgetting it changes
//! nothing, as the hash places its next packet on the same node. With none to evict the insert
//! is refused, and the caller places the flow statelessly by the same hash. A confirmed flow, or
//! an unconfirmed one placed by the policy, leaves only by expiry or removal, so a flood of
//! spoofed packets can neither push out idle established connections nor handshakes in flight.

use std::time::Duration;

use foldhash::fast::FixedState;
use hashbrown::HashTable;
use ringlb_wire::FlowKey;

use crate::{NodeId, Timestamp};

const NIL: u32 = u32::MAX;
const TCP: u8 = 6;

/// Limits and timeouts of the flow table.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowConfig {
    /// Most flows tracked at once.
    pub max_flows: usize,
    /// The share of `max_flows` that unconfirmed flows may hold (0 < share <= 1; rounded up to
    /// at least one flow). The rest is reachable only by confirmation, so a flood of spoofed
    /// first packets takes at most this share.
    pub unconfirmed_share: f64,
    /// Unconfirmed TCP flow: a SYN, or a mid-stream packet of an unknown connection, with no
    /// later packet yet.
    pub tcp_handshake_idle: Duration,
    /// TCP flow after the handshake.
    pub tcp_established_idle: Duration,
    /// TCP flow after FIN or RST: kept this long after its last packet, so stragglers and
    /// the last ACKs still reach the same node.
    pub tcp_closing_linger: Duration,
    pub udp_idle: Duration,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            max_flows: 1_000_000,
            // Legitimate unconfirmed flows are handshakes in flight (one round trip each) and
            // single-datagram UDP exchanges waiting out `udp_idle`; a quarter leaves room for
            // those while three quarters stay for confirmed flows whatever a flood does.
            unconfirmed_share: 0.25,
            tcp_handshake_idle: Duration::from_secs(30),
            tcp_established_idle: Duration::from_secs(900),
            tcp_closing_linger: Duration::from_secs(10),
            udp_idle: Duration::from_secs(120),
        }
    }
}

impl FlowConfig {
    /// How many unconfirmed flows the table holds at most.
    pub fn unconfirmed_quota(&self) -> usize {
        // The float product is within 0..=max_flows for a valid share; the clamp covers the rest.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let quota = (self.max_flows as f64 * self.unconfirmed_share).ceil() as usize;
        quota.clamp(1, self.max_flows.max(1))
    }
}

/// Where a flow is in its life, as far as the client's packets tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// No packet after the first yet (a SYN, or a mid-stream packet of an unknown connection),
    /// or a new SYN on a tracked tuple.
    TcpHandshake,
    TcpEstablished,
    TcpClosing,
    Udp,
}

/// How a new flow was placed, which decides whether pressure may evict it before it is
/// confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacedBy {
    /// By the policy: forgotten, its next packet would be hashed, maybe to another node.
    Policy,
    /// By consistent hash: its next packet gets the same answer whether it is tracked or not.
    Hash,
}

/// One list per state and standing; each has a single idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    /// Unconfirmed, placed by the policy.
    TcpNew,
    UdpNew,
    /// Unconfirmed, placed by consistent hash: what pressure evicts.
    TcpNewByHash,
    UdpNewByHash,
    /// Confirmed, and a new SYN came (the client reused the tuple for a new connection).
    TcpReopened,
    TcpEstablished,
    TcpClosing,
    Udp,
}

impl List {
    const COUNT: usize = 8;
    const ALL: [List; List::COUNT] = [
        List::TcpNew,
        List::UdpNew,
        List::TcpNewByHash,
        List::UdpNewByHash,
        List::TcpReopened,
        List::TcpEstablished,
        List::TcpClosing,
        List::Udp,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn unconfirmed(self) -> bool {
        self.index() < List::TcpReopened.index()
    }

    fn new_flow(tcp: bool, by: PlacedBy) -> List {
        match (tcp, by) {
            (true, PlacedBy::Policy) => List::TcpNew,
            (false, PlacedBy::Policy) => List::UdpNew,
            (true, PlacedBy::Hash) => List::TcpNewByHash,
            (false, PlacedBy::Hash) => List::UdpNewByHash,
        }
    }

    fn state(self) -> FlowState {
        match self {
            List::TcpNew | List::TcpNewByHash | List::TcpReopened => FlowState::TcpHandshake,
            List::TcpEstablished => FlowState::TcpEstablished,
            List::TcpClosing => FlowState::TcpClosing,
            List::UdpNew | List::UdpNewByHash | List::Udp => FlowState::Udp,
        }
    }

    /// The list after a later packet moved the flow to `state`: every later packet confirms,
    /// except a repeated SYN (a spoofer can repeat one as easily as send it).
    fn after(self, state: FlowState) -> List {
        match state {
            FlowState::TcpHandshake if matches!(self, List::TcpNew | List::TcpNewByHash) => self,
            FlowState::TcpHandshake => List::TcpReopened,
            FlowState::TcpEstablished => List::TcpEstablished,
            FlowState::TcpClosing => List::TcpClosing,
            FlowState::Udp => List::Udp,
        }
    }
}

/// 64 bytes. Aligning it to 64 (`#[repr(align(64))]`) was measured: the flow-table hit got
/// slower (109–114 ns against 92 ns) and 1M flows took 81 MiB instead of 71 MiB, so it is not.
#[derive(Debug, Clone)]
struct Slot {
    key: FlowKey,
    target: NodeId,
    list: List,
    last_seen: Timestamp,
    prev: u32,
    /// Next in the flow's list, or in the free list when the slot is free.
    next: u32,
}

/// Result of a successful [`FlowTable::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insert {
    pub handle: u32,
    /// The unconfirmed, hash-placed flow forgotten to make room, if the table was under pressure.
    pub evicted: Option<(FlowKey, NodeId)>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct FlowTable {
    config: FlowConfig,
    timeouts: [Duration; List::COUNT],
    unconfirmed_quota: usize,
    index: HashTable<u32>,
    hasher: FixedState,
    slots: Vec<Slot>,
    free: u32,
    len: usize,
    /// Flows in the unconfirmed lists.
    unconfirmed: usize,
    heads: [u32; List::COUNT],
    tails: [u32; List::COUNT],
    /// Flows per target node, the entry's own measure of what it has sent where.
    per_target: Vec<u32>,
}

impl FlowTable {
    /// `seed` keys the hash of the index, so that remote hosts cannot aim collisions at it.
    pub fn new(config: FlowConfig, seed: u64) -> Self {
        let initial = config.max_flows.min(4096);
        let timeouts = List::ALL.map(|l| match l.state() {
            FlowState::TcpHandshake => config.tcp_handshake_idle,
            FlowState::TcpEstablished => config.tcp_established_idle,
            FlowState::TcpClosing => config.tcp_closing_linger,
            FlowState::Udp => config.udp_idle,
        });
        FlowTable {
            timeouts,
            unconfirmed_quota: config.unconfirmed_quota(),
            index: HashTable::with_capacity(initial),
            hasher: FixedState::with_seed(seed),
            slots: Vec::with_capacity(initial),
            free: NIL,
            len: 0,
            unconfirmed: 0,
            heads: [NIL; List::COUNT],
            tails: [NIL; List::COUNT],
            per_target: Vec::new(),
            config,
        }
    }

    pub fn config(&self) -> &FlowConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flows tracked that no later packet has confirmed yet.
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed
    }

    /// Whether a new flow fits without evicting anything: neither the unconfirmed quota nor
    /// the table is full. When not, the table is under pressure and new flows should be placed
    /// by consistent hash.
    pub fn has_room(&self) -> bool {
        self.len < self.config.max_flows && self.unconfirmed < self.unconfirmed_quota
    }

    /// Flows currently pinned to `node`.
    pub fn flows_on(&self, node: NodeId) -> u32 {
        self.per_target.get(node.index()).copied().unwrap_or(0)
    }

    fn hash(&self, key: &FlowKey) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    /// The handle of `key`'s flow, if tracked.
    pub fn find(&self, key: &FlowKey) -> Option<u32> {
        let slots = &self.slots;
        self.index.find(self.hash(key), |&i| slots[i as usize].key == *key).copied()
    }

    pub fn target(&self, handle: u32) -> NodeId {
        self.slots[handle as usize].target
    }

    pub fn state(&self, handle: u32) -> FlowState {
        self.slots[handle as usize].list.state()
    }

    /// Whether a packet after the flow's first has been seen.
    pub fn is_confirmed(&self, handle: u32) -> bool {
        !self.slots[handle as usize].list.unconfirmed()
    }

    /// Records a later packet of a flow at `now`, moving it to `state`; this confirms the flow
    /// unless the packet is a repeated SYN.
    pub fn touch(&mut self, handle: u32, now: Timestamp, state: FlowState) {
        self.unlink(handle);
        let slot = &mut self.slots[handle as usize];
        let list = slot.list.after(state);
        if slot.list.unconfirmed() && !list.unconfirmed() {
            self.unconfirmed -= 1;
        }
        slot.list = list;
        slot.last_seen = slot.last_seen.max(now);
        self.push_back(handle);
    }

    /// Tracks a new, unconfirmed flow (its protocol decides TCP or UDP); `key` must not be
    /// tracked yet. Under pressure it evicts the oldest unconfirmed flow placed by hash; with
    /// none, it returns `None` and tracks nothing (see the module documentation).
    pub fn insert(&mut self, now: Timestamp, key: FlowKey, target: NodeId, placed: PlacedBy) -> Option<Insert> {
        debug_assert!(self.find(&key).is_none());
        let mut evicted = None;
        if !self.has_room() {
            let victim = self.oldest_evictable()?;
            evicted = Some((self.slots[victim as usize].key, self.slots[victim as usize].target));
            self.remove(victim);
        }
        let list = List::new_flow(key.proto == TCP, placed);
        let slot = Slot { key, target, list, last_seen: now, prev: NIL, next: NIL };
        let handle = if self.free != NIL {
            let h = self.free;
            self.free = self.slots[h as usize].next;
            self.slots[h as usize] = slot;
            h
        } else {
            // The slab never outgrows max_flows, which config validation caps below u32::MAX.
            let h = u32::try_from(self.slots.len()).unwrap_or(NIL - 1);
            self.slots.push(slot);
            h
        };
        let hash = self.hash(&key);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index.insert_unique(hash, handle, |&i| {
            use std::hash::BuildHasher;
            hasher.hash_one(slots[i as usize].key)
        });
        self.push_back(handle);
        self.len += 1;
        self.unconfirmed += 1;
        let t = target.index();
        if self.per_target.len() <= t {
            self.per_target.resize(t + 1, 0);
        }
        self.per_target[t] += 1;
        Some(Insert { handle, evicted })
    }

    /// Pins a flow to another node (its pinned node died).
    pub fn retarget(&mut self, handle: u32, target: NodeId) {
        let old = self.slots[handle as usize].target.index();
        self.per_target[old] -= 1;
        let t = target.index();
        if self.per_target.len() <= t {
            self.per_target.resize(t + 1, 0);
        }
        self.per_target[t] += 1;
        self.slots[handle as usize].target = target;
    }

    /// Stops tracking the flow.
    pub fn remove(&mut self, handle: u32) {
        let key = self.slots[handle as usize].key;
        let hash = self.hash(&key);
        if let Ok(entry) = self.index.find_entry(hash, |&i| i == handle) {
            entry.remove();
        }
        self.unlink(handle);
        let slot = &self.slots[handle as usize];
        if slot.list.unconfirmed() {
            self.unconfirmed -= 1;
        }
        self.per_target[slot.target.index()] -= 1;
        self.slots[handle as usize].next = self.free;
        self.free = handle;
        self.len -= 1;
    }

    /// The least recently active unconfirmed flow placed by hash: the only kind pressure evicts.
    fn oldest_evictable(&self) -> Option<u32> {
        [self.heads[List::TcpNewByHash.index()], self.heads[List::UdpNewByHash.index()]]
            .into_iter()
            .filter(|&h| h != NIL)
            .min_by_key(|&h| self.slots[h as usize].last_seen)
    }

    /// When the next flow will expire, for the driver's timer.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        (0..List::COUNT)
            .filter(|&l| self.heads[l] != NIL)
            .map(|l| self.slots[self.heads[l] as usize].last_seen.saturating_add(self.timeouts[l]))
            .min()
    }

    /// Forgets every flow idle for longer than its state's timeout; returns how many.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let mut n = 0;
        for list in 0..List::COUNT {
            loop {
                let h = self.heads[list];
                if h == NIL || now.saturating_since(self.slots[h as usize].last_seen) < self.timeouts[list] {
                    break;
                }
                self.remove(h);
                n += 1;
            }
        }
        n
    }

    /// Flows whose target satisfies `pick` and that are open: established, UDP, or in a
    /// handshake that saw a packet at or after `handshakes_since` (closing ones are not).
    /// Walks them all: for a stopping daemon's few checks a second, not for the packet path.
    pub fn count_open(&self, handshakes_since: Timestamp, mut pick: impl FnMut(NodeId) -> bool) -> usize {
        let mut n = 0;
        for list in List::ALL.into_iter().filter(|l| l.state() != FlowState::TcpClosing) {
            let mut h = self.heads[list.index()];
            while h != NIL {
                let s = &self.slots[h as usize];
                let quiet = list.state() == FlowState::TcpHandshake && s.last_seen < handshakes_since;
                n += usize::from(!quiet && pick(s.target));
                h = s.next;
            }
        }
        n
    }

    /// Calls `f` with every established TCP flow and its target (a few times a minute, to tell
    /// the flows' homes who serves them; never per packet).
    pub fn for_each_established(&self, mut f: impl FnMut(&FlowKey, NodeId)) {
        let mut h = self.heads[List::TcpEstablished.index()];
        while h != NIL {
            let s = &self.slots[h as usize];
            f(&s.key, s.target);
            h = s.next;
        }
    }

    fn push_back(&mut self, h: u32) {
        let list = self.slots[h as usize].list.index();
        let tail = self.tails[list];
        self.slots[h as usize].prev = tail;
        self.slots[h as usize].next = NIL;
        if tail == NIL {
            self.heads[list] = h;
        } else {
            self.slots[tail as usize].next = h;
        }
        self.tails[list] = h;
    }

    fn unlink(&mut self, h: u32) {
        let list = self.slots[h as usize].list.index();
        let (prev, next) = (self.slots[h as usize].prev, self.slots[h as usize].next);
        if prev == NIL {
            self.heads[list] = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tails[list] = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    /// Walks every list and the index and checks they agree and the limits hold; for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let (mut seen, mut unconfirmed) = (0, 0);
        for list in List::ALL {
            let mut prev = NIL;
            let mut h = self.heads[list.index()];
            let mut last = Timestamp::ZERO;
            while h != NIL {
                let s = &self.slots[h as usize];
                assert_eq!(s.list, list, "slot in wrong list");
                assert_eq!(s.prev, prev, "broken back link");
                assert!(s.last_seen >= last, "list out of order");
                assert_eq!(self.find(&s.key), Some(h), "index disagrees with list");
                let tcp_list = matches!(
                    s.list.state(),
                    FlowState::TcpHandshake | FlowState::TcpEstablished | FlowState::TcpClosing
                );
                assert_eq!(s.key.proto == TCP, tcp_list, "flow in a list of the other protocol");
                last = s.last_seen;
                prev = h;
                h = s.next;
                seen += 1;
                unconfirmed += usize::from(list.unconfirmed());
            }
            assert_eq!(self.tails[list.index()], prev, "tail disagrees");
        }
        assert_eq!(seen, self.len);
        assert_eq!(unconfirmed, self.unconfirmed, "unconfirmed count disagrees with the lists");
        assert!(self.unconfirmed <= self.unconfirmed_quota, "unconfirmed flows beyond their quota");
        assert!(self.unconfirmed_quota <= self.config.max_flows.max(1));
        assert_eq!(self.index.len(), self.len);
        assert_eq!(self.per_target.iter().map(|&c| c as usize).sum::<usize>(), self.len);
        assert!(self.len <= self.config.max_flows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn a_slot_is_at_most_64_bytes() {
        assert!(std::mem::size_of::<Slot>() <= 64, "{} bytes", std::mem::size_of::<Slot>());
    }

    fn flow(port: u16, proto: u8) -> FlowKey {
        FlowKey::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(10, 200, 0, 10)), port, 80, proto)
    }

    fn key(port: u16) -> FlowKey {
        flow(port, TCP)
    }

    fn ukey(port: u16) -> FlowKey {
        flow(port, 17)
    }

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_duration(Duration::from_secs(secs))
    }

    fn table(max: usize, share: f64) -> FlowTable {
        FlowTable::new(FlowConfig { max_flows: max, unconfirmed_share: share, ..FlowConfig::default() }, 1)
    }

    fn insert(t: &mut FlowTable, now: Timestamp, key: FlowKey, target: u16, placed: PlacedBy) -> Option<Insert> {
        let ins = t.insert(now, key, NodeId(target), placed);
        t.check_invariants();
        ins
    }

    /// Inserts and confirms a flow: an established TCP connection or a UDP flow past its first
    /// datagram.
    fn confirmed(t: &mut FlowTable, now: Timestamp, key: FlowKey, target: u16) -> u32 {
        let h = insert(t, now, key, target, PlacedBy::Policy).expect("room").handle;
        let state = if key.proto == TCP { FlowState::TcpEstablished } else { FlowState::Udp };
        t.touch(h, now, state);
        h
    }

    #[test]
    fn expiry_follows_each_states_timeout() {
        let mut t = table(10, 1.0);
        let a = confirmed(&mut t, at(0), key(1), 0);
        let c = confirmed(&mut t, at(0), key(2), 1);
        t.touch(c, at(0), FlowState::TcpClosing);
        confirmed(&mut t, at(0), ukey(3), 1);
        insert(&mut t, at(0), key(4), 2, PlacedBy::Hash);
        insert(&mut t, at(0), ukey(5), 2, PlacedBy::Policy);
        assert_eq!(t.next_expiry(), Some(at(10)));
        assert_eq!(t.expire(at(9)), 0);
        assert_eq!(t.expire(at(10)), 1, "closing flow lingers 10 s");
        assert_eq!(t.find(&key(2)), None);
        assert_eq!(t.expire(at(30)), 1, "an unconfirmed tcp flow lasts the handshake timeout");
        assert_eq!(t.expire(at(120)), 2, "udp idles out at 120 s, confirmed or not");
        t.touch(a, at(800), FlowState::TcpEstablished);
        assert_eq!(t.expire(at(900)), 0, "touch refreshed the established flow");
        assert_eq!(t.expire(at(1700)), 1);
        assert!(t.is_empty());
        t.check_invariants();
    }

    #[test]
    fn later_packets_confirm_except_a_repeated_syn() {
        let mut t = table(10, 1.0);
        let syn = insert(&mut t, at(0), key(1), 0, PlacedBy::Policy).unwrap().handle;
        t.touch(syn, at(1), FlowState::TcpHandshake);
        assert!(!t.is_confirmed(syn), "a repeated SYN confirms nothing");
        t.touch(syn, at(2), FlowState::TcpEstablished);
        assert!(t.is_confirmed(syn));
        // A new SYN on the confirmed tuple: a new connection, still confirmed, short timeout.
        t.touch(syn, at(3), FlowState::TcpHandshake);
        assert!(t.is_confirmed(syn));
        assert_eq!(t.state(syn), FlowState::TcpHandshake);
        let mid = insert(&mut t, at(0), key(2), 1, PlacedBy::Hash).unwrap().handle;
        t.touch(mid, at(1), FlowState::TcpClosing);
        assert!(t.is_confirmed(mid), "a FIN after a mid-stream packet confirms the flow, as closing");
        let udp = insert(&mut t, at(0), ukey(3), 2, PlacedBy::Policy).unwrap().handle;
        assert!(!t.is_confirmed(udp));
        t.touch(udp, at(1), FlowState::Udp);
        assert!(t.is_confirmed(udp), "a second datagram confirms");
        assert_eq!(t.unconfirmed(), 0);
        assert_eq!(t.expire(at(32)), 1, "the closing flow lingered 10 s");
        assert_eq!(t.expire(at(33)), 1, "the reopened tuple lasts the handshake timeout");
        t.check_invariants();
    }

    #[test]
    fn open_flows_are_counted_by_target_and_closing_ones_not() {
        let mut t = table(10, 1.0);
        for (k, target, state) in [
            (key(1), 0, FlowState::TcpHandshake),
            (key(2), 1, FlowState::TcpEstablished),
            (key(3), 1, FlowState::TcpClosing),
            (ukey(4), 1, FlowState::Udp),
            (key(5), 2, FlowState::TcpEstablished),
        ] {
            let h = insert(&mut t, at(0), k, target, PlacedBy::Policy).unwrap().handle;
            t.touch(h, at(0), state);
        }
        assert_eq!(t.count_open(at(0), |_| true), 4);
        assert_eq!(t.count_open(at(0), |n| n == NodeId(1)), 2, "the closing flow is not counted");
        assert_eq!(t.count_open(at(0), |n| n != NodeId(0)), 3);
        let h = t.find(&key(2)).unwrap();
        t.touch(h, at(1), FlowState::TcpClosing);
        assert_eq!(t.count_open(at(0), |n| n == NodeId(1)), 1);
        assert_eq!(t.count_open(at(1), |n| n == NodeId(0)), 0, "the handshake has been quiet since 0 s");
        t.check_invariants();
    }

    #[test]
    fn pressure_evicts_only_unconfirmed_flows_placed_by_hash() {
        // 8 flows, 4 of them unconfirmed at most.
        let mut t = table(8, 0.5);
        confirmed(&mut t, at(0), key(1), 0);
        confirmed(&mut t, at(0), ukey(2), 0);
        insert(&mut t, at(2), key(3), 1, PlacedBy::Policy);
        insert(&mut t, at(3), key(4), 2, PlacedBy::Hash);
        insert(&mut t, at(4), ukey(5), 2, PlacedBy::Hash);
        insert(&mut t, at(5), ukey(6), 1, PlacedBy::Policy);
        assert_eq!((t.len(), t.unconfirmed()), (6, 4));
        assert!(!t.has_room(), "unconfirmed quota full");
        // The oldest hash-placed unconfirmed flow goes; the idle confirmed flows and the
        // handshake placed by the policy stay, older as they are.
        let ins = insert(&mut t, at(6), key(7), 0, PlacedBy::Hash).unwrap();
        assert_eq!(ins.evicted, Some((key(4), NodeId(2))));
        let ins = insert(&mut t, at(7), key(8), 0, PlacedBy::Policy).unwrap();
        assert_eq!(ins.evicted, Some((ukey(5), NodeId(2))));
        let ins = insert(&mut t, at(8), key(9), 1, PlacedBy::Hash).unwrap();
        assert_eq!(ins.evicted, Some((key(7), NodeId(0))));
        // Left unconfirmed: key 3, ukey 6, key 8 (policy) and key 9 (hash).
        let ins = insert(&mut t, at(9), key(10), 1, PlacedBy::Hash).unwrap();
        assert_eq!(ins.evicted, Some((key(9), NodeId(1))));
        // Confirmation frees quota without changing the table's size.
        let h = t.find(&key(10)).unwrap();
        t.touch(h, at(10), FlowState::TcpEstablished);
        assert!(t.has_room());
        let ins = insert(&mut t, at(11), key(11), 2, PlacedBy::Policy).unwrap();
        assert_eq!(ins.evicted, None);
        // Now only policy-placed unconfirmed flows: nothing may go, the insert is refused.
        assert_eq!(insert(&mut t, at(12), key(12), 2, PlacedBy::Hash), None);
        for k in [1, 3, 8, 10, 11] {
            assert!(t.find(&key(k)).is_some(), "key {k} was evicted");
        }
        // A table full of confirmed flows refuses too, quota or not.
        let mut t = table(3, 0.5);
        for k in 1..=3 {
            confirmed(&mut t, at(k.into()), key(k), 0);
        }
        assert_eq!(t.unconfirmed(), 0);
        assert!(!t.has_room());
        assert_eq!(insert(&mut t, at(9), key(4), 0, PlacedBy::Hash), None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.flows_on(NodeId(0)), 3);
    }

    #[test]
    fn the_quota_is_a_share_of_the_table_rounded_up() {
        let quota = |max, share| {
            FlowConfig { max_flows: max, unconfirmed_share: share, ..FlowConfig::default() }.unconfirmed_quota()
        };
        assert_eq!(quota(1_000_000, 0.25), 250_000);
        assert_eq!(quota(20_000, 0.1), 2_000);
        assert_eq!(quota(3, 0.5), 2);
        assert_eq!(quota(1, 0.01), 1);
        assert_eq!(quota(10, 1.0), 10);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Key, placed by hash.
        Insert(u16, bool),
        Touch(u16, u8),
        Remove(u16),
        Advance(u8),
    }

    /// Even keys are TCP, odd ones UDP.
    fn any_key(k: u16) -> FlowKey {
        if k & 1 == 0 {
            key(k)
        } else {
            ukey(k)
        }
    }

    fn later_state(k: FlowKey, s: u8) -> FlowState {
        if k.proto == TCP {
            [FlowState::TcpHandshake, FlowState::TcpEstablished, FlowState::TcpClosing][usize::from(s % 3)]
        } else {
            FlowState::Udp
        }
    }

    proptest! {
        #[test]
        fn random_operations_keep_structure_and_never_evict_what_must_stay(
            max in 1usize..24,
            share in prop_oneof![Just(0.1), Just(0.25), Just(0.5), Just(1.0)],
            ops in proptest::collection::vec(
            prop_oneof![
                (0u16..64, any::<bool>()).prop_map(|(k, h)| Op::Insert(k, h)),
                (0u16..64, any::<u8>()).prop_map(|(k, s)| Op::Touch(k, s)),
                (0u16..64).prop_map(Op::Remove),
                any::<u8>().prop_map(Op::Advance),
            ], 1..400)) {
            let mut t = table(max, share);
            let mut now = at(0);
            for op in ops {
                match op {
                    Op::Insert(k, by_hash) => if t.find(&any_key(k)).is_none() {
                        // Every tracked flow, and whether pressure may take it.
                        let tracked: Vec<(FlowKey, bool, Timestamp)> = (0..64)
                            .filter_map(|j| t.find(&any_key(j)))
                            .map(|h| {
                                let s = &t.slots[h as usize];
                                (s.key, matches!(s.list, List::TcpNewByHash | List::UdpNewByHash), s.last_seen)
                            })
                            .collect();
                        let room = t.has_room();
                        let placed = if by_hash { PlacedBy::Hash } else { PlacedBy::Policy };
                        match t.insert(now, any_key(k), NodeId(k % 3), placed) {
                            None => prop_assert!(!room && tracked.iter().all(|&(_, ev, _)| !ev), "refused with room or a victim"),
                            Some(Insert { evicted: None, .. }) => prop_assert!(room, "grew past a limit"),
                            Some(Insert { evicted: Some((victim, _)), .. }) => {
                                prop_assert!(!room, "evicted with room to spare");
                                let &(_, evictable, seen) = tracked.iter().find(|f| f.0 == victim).unwrap();
                                // Never a confirmed flow, never one placed by the policy: an
                                // established flow is never evicted while an unconfirmed one exists.
                                prop_assert!(evictable, "evicted {victim:?}, which must stay");
                                prop_assert!(tracked.iter().filter(|f| f.1).all(|f| f.2 >= seen), "not the oldest");
                            }
                        }
                        for (key, evictable, _) in tracked {
                            prop_assert!(evictable || t.find(&key).is_some(), "{key:?} disappeared");
                        }
                    },
                    Op::Touch(k, s) => if let Some(h) = t.find(&any_key(k)) { t.touch(h, now, later_state(any_key(k), s)) },
                    Op::Remove(k) => if let Some(h) = t.find(&any_key(k)) { t.remove(h) },
                    Op::Advance(secs) => { now = now.saturating_add(Duration::from_secs(u64::from(secs))); t.expire(now); }
                }
                t.check_invariants();
            }
        }
    }
}
