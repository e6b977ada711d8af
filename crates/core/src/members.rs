//! The cluster as this node sees it: who the members are, where they live, whether they may
//! take new flows, and how loaded they are.

use std::net::IpAddr;

use hashbrown::HashMap;

/// Index of a member in [`Members`]. An id is reused for another member only once the cluster
/// has forgotten its member and no flow points to it, so a flow pinned to an id keeps meaning
/// the same member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u16);

impl NodeId {
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// What a member may be asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Takes new flows and serves its pinned ones.
    Alive,
    /// Might be down: takes no new flows, keeps its pinned ones until confirmed dead.
    Suspect,
    /// Leaving on purpose: takes no new flows, serves its pinned ones to the end.
    Draining,
    /// Gone on purpose (its daemon stopped): takes no new flows; its pinned flows stay, since
    /// its kernel still holds them, until the cluster forgets it.
    Left,
    /// Gone, as failure detection concluded: takes nothing.
    Dead,
}

impl MemberState {
    pub fn takes_new_flows(self) -> bool {
        self == MemberState::Alive
    }

    /// Dead or left: it takes no new flows and is nobody's home.
    pub fn is_gone(self) -> bool {
        matches!(self, MemberState::Dead | MemberState::Left)
    }

    /// The name in metrics and status.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Draining => "draining",
            MemberState::Left => "left",
            MemberState::Dead => "dead",
        }
    }
}

/// One member of the cluster, this node included.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    /// Underlay address carrier packets are sent to and accepted from.
    pub addr: IpAddr,
    /// Relative capacity; 0 means "forwards only, serves nothing".
    pub weight: f64,
    pub state: MemberState,
    /// The member's latest load vector and when it arrived; `None` while none has (e.g. with
    /// a static member list).
    pub load: Option<LoadReport>,
    /// Stable per-name hash, so all nodes rank members alike in consistent hashing.
    pub(crate) name_hash: u64,
    /// Forgotten by the cluster: its slot stays (ids are stable) but its name and address are
    /// free.
    pub(crate) removed: bool,
    /// The site it is in; entries keep new flows in their own site while it has room.
    pub site: String,
    /// The control plane's latest round-trip time to it (none for this node itself).
    pub rtt: Option<std::time::Duration>,
}

/// This node's own load as its data plane measures it, for its load vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalLoad {
    pub served_flows: u32,
    /// Monotonic count of new flows served, for the rate.
    pub served_new_flows: u64,
}

/// What a member last said about its own load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// Flows it serves, from all entries.
    pub served_flows: u32,
    pub new_flows_per_sec: f32,
    pub cpu: f32,
    pub received: crate::Timestamp,
}

impl Member {
    pub fn new(name: impl Into<String>, addr: IpAddr, weight: f64) -> Self {
        let name = name.into();
        let name_hash = name_hash(&name);
        Member {
            name,
            addr,
            weight,
            state: MemberState::Alive,
            load: None,
            name_hash,
            removed: false,
            site: crate::cluster::message::DEFAULT_SITE.to_owned(),
            rtt: None,
        }
    }
}

impl Member {
    /// Whether the cluster forgot it (see [`Members::remove`]).
    pub fn is_removed(&self) -> bool {
        self.removed
    }
}

fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Errors when building the member list.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MembersError {
    #[error("member name {0:?} appears twice")]
    DuplicateName(String),
    #[error("member address {0} appears twice")]
    DuplicateAddr(IpAddr),
    #[error("more than 65535 members")]
    TooMany,
}

/// The member list, indexed by [`NodeId`] and by underlay address.
#[derive(Debug, Clone)]
pub struct Members {
    list: Vec<Member>,
    by_addr: HashMap<IpAddr, NodeId, foldhash::fast::FixedState>,
}

impl Members {
    pub fn new(members: impl IntoIterator<Item = Member>) -> Result<Self, MembersError> {
        let mut m = Members { list: Vec::new(), by_addr: HashMap::with_hasher(foldhash::fast::FixedState::default()) };
        for member in members {
            m.add(member)?;
        }
        Ok(m)
    }

    /// Appends a member and returns its id.
    pub fn add(&mut self, member: Member) -> Result<NodeId, MembersError> {
        if self.list.iter().any(|m| !m.removed && m.name == member.name) {
            return Err(MembersError::DuplicateName(member.name));
        }
        if self.by_addr.contains_key(&member.addr) {
            return Err(MembersError::DuplicateAddr(member.addr));
        }
        let id = NodeId(u16::try_from(self.list.len()).map_err(|_| MembersError::TooMany)?);
        self.by_addr.insert(member.addr, id);
        self.list.push(member);
        Ok(id)
    }

    /// Puts a new member in the slot of a removed one (which nothing may still point to).
    pub fn reuse(&mut self, id: NodeId, member: Member) -> Result<(), MembersError> {
        if self.list.iter().any(|m| !m.removed && m.name == member.name) {
            return Err(MembersError::DuplicateName(member.name));
        }
        if self.by_addr.contains_key(&member.addr) {
            return Err(MembersError::DuplicateAddr(member.addr));
        }
        if let Some(slot) = self.list.get_mut(id.index()).filter(|m| m.removed) {
            self.by_addr.insert(member.addr, id);
            *slot = member;
        }
        Ok(())
    }

    /// Forgets a member: it takes nothing, and its name and address are free for others. Its
    /// id stays valid (flows pinned to it see it gone) until [`Members::reuse`].
    pub fn remove(&mut self, id: NodeId) {
        if let Some(m) = self.list.get_mut(id.index()) {
            if self.by_addr.get(&m.addr) == Some(&id) {
                self.by_addr.remove(&m.addr);
            }
            m.state = MemberState::Dead;
            m.load = None;
            m.removed = true;
        }
    }

    /// Frees `addr` if a gone member holds it, so that a live one can take it.
    pub fn release_addr_of_gone(&mut self, addr: IpAddr) {
        if let Some(&id) = self.by_addr.get(&addr) {
            if self.list.get(id.index()).is_some_and(|m| m.state.is_gone()) {
                self.remove(id);
            }
        }
    }

    /// Moves a member to another underlay address.
    pub fn set_addr(&mut self, id: NodeId, addr: IpAddr) -> Result<(), MembersError> {
        match self.by_addr.get(&addr) {
            Some(&other) if other != id => return Err(MembersError::DuplicateAddr(addr)),
            _ => {}
        }
        if let Some(m) = self.list.get_mut(id.index()) {
            self.by_addr.remove(&m.addr);
            m.addr = addr;
            self.by_addr.insert(addr, id);
        }
        Ok(())
    }

    pub fn get(&self, id: NodeId) -> Option<&Member> {
        self.list.get(id.index())
    }

    pub fn get_mut(&mut self, id: NodeId) -> Option<&mut Member> {
        self.list.get_mut(id.index())
    }

    pub fn by_addr(&self, addr: IpAddr) -> Option<NodeId> {
        self.by_addr.get(&addr).copied()
    }

    pub fn by_name(&self, name: &str) -> Option<NodeId> {
        self.iter().find(|(_, m)| !m.removed && m.name == name).map(|(id, _)| id)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &Member)> {
        // The constructor guarantees at most 65536 entries, so the index fits.
        self.list.iter().enumerate().map(|(i, m)| (NodeId(u16::try_from(i).unwrap_or(u16::MAX)), m))
    }
}
