//! Counters: one for every drop reason and every decision, read by the metrics endpoint.

use ringlb_wire::MalformedReason;

/// Why a packet was dropped. Hot-path failures are this `Copy` value, counted, never logged
/// per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than its headers say.
    Truncated,
    /// Bad IP version, IHL, total length or header checksum.
    BadIpHeader,
    /// Bad TCP or UDP header (TCP data offset, UDP length out of range).
    BadTransportHeader,
    /// An IP fragment: ringlb never depends on fragmentation.
    Fragment,
    /// Not TCP, UDP or ICMP, or behind an IPsec authentication header.
    UnsupportedProtocol,
    /// Inner destination is not the VIP.
    NotVip,
    /// Carrier packet whose outer source is not a cluster member.
    NotMember,
    /// Carrier datagram that is not a valid outer packet.
    BadCarrierHeader,
    /// Sending on the carrier failed (e.g. buffer full, no route).
    CarrierSendError,
    /// Writing into the TUN failed.
    TunWriteError,
    /// Larger than the path can carry without fragmentation.
    TooBig,
    /// A packet of a connection no entry knows and no server has claimed yet, while the flow
    /// directory settles after a (re)start or a change of members: the client sends it again.
    UnclaimedFlow,
    /// A sealed carrier packet that does not authenticate (forged or corrupted).
    CarrierForged,
    /// A sealed carrier packet seen before, or older than the replay window.
    CarrierReplayed,
    /// A sealed carrier packet under a key this node has retired.
    CarrierStaleKey,
    /// A sealed carrier packet from a sender with no session key, or a key id never issued;
    /// or a packet to a peer this node has no key for yet.
    CarrierNoKey,
    /// A plaintext carrier packet where only sealed ones are taken (another site, or
    /// `carrier.require_authenticated`).
    CarrierPlaintextRefused,
}

impl DropReason {
    pub const ALL: [DropReason; 17] = [
        DropReason::Truncated,
        DropReason::BadIpHeader,
        DropReason::BadTransportHeader,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::NotVip,
        DropReason::NotMember,
        DropReason::BadCarrierHeader,
        DropReason::CarrierSendError,
        DropReason::TunWriteError,
        DropReason::TooBig,
        DropReason::UnclaimedFlow,
        DropReason::CarrierForged,
        DropReason::CarrierReplayed,
        DropReason::CarrierStaleKey,
        DropReason::CarrierNoKey,
        DropReason::CarrierPlaintextRefused,
    ];

    /// Metric label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::BadTransportHeader => "bad_transport_header",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::NotVip => "not_vip",
            DropReason::NotMember => "not_member",
            DropReason::BadCarrierHeader => "bad_carrier_header",
            DropReason::CarrierSendError => "carrier_send_error",
            DropReason::TunWriteError => "tun_write_error",
            DropReason::TooBig => "too_big",
            DropReason::UnclaimedFlow => "unclaimed_flow",
            DropReason::CarrierForged => "carrier_forged",
            DropReason::CarrierReplayed => "carrier_replayed",
            DropReason::CarrierStaleKey => "carrier_stale_key",
            DropReason::CarrierNoKey => "carrier_no_key",
            DropReason::CarrierPlaintextRefused => "carrier_plaintext_refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<MalformedReason> for DropReason {
    fn from(r: MalformedReason) -> Self {
        match r {
            MalformedReason::Truncated => DropReason::Truncated,
            MalformedReason::BadIpHeader => DropReason::BadIpHeader,
            MalformedReason::BadTransportHeader => DropReason::BadTransportHeader,
            MalformedReason::Fragment => DropReason::Fragment,
            MalformedReason::UnsupportedProtocol => DropReason::UnsupportedProtocol,
        }
    }
}

/// Monotonic counters of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    drops: [u64; DropReason::ALL.len()],
    /// Packets from the TUN handed back to the local kernel.
    pub delivered_local: u64,
    /// Packets from the TUN sent to a peer.
    pub forwarded: u64,
    /// Carrier packets accepted and delivered locally.
    pub decapsulated: u64,
    /// New flows placed on this node.
    pub placed_local: u64,
    /// New flows placed on a peer.
    pub placed_peer: u64,
    /// New flows placed in another site than the entry's.
    pub placed_cross_site: u64,
    /// Flows of unknown origin (non-SYN, e.g. after a restart) placed by consistent hash.
    pub placed_by_hash_fallback: u64,
    /// New flows an entry that takes none itself (weight 0, draining) placed on a peer in doubt
    /// (suspect, or its load late) because no peer took new flows.
    pub placed_on_doubtful: u64,
    /// New flows (SYNs, first datagrams) placed by consistent hash instead of the policy because
    /// the flow table was under pressure (its unconfirmed quota or the table full), or for UDP
    /// had been within `udp_idle`.
    pub placed_by_hash_under_pressure: u64,
    /// SYNs whose MSS was lowered to fit the carrier.
    pub mss_clamped: u64,
    pub flows_created: u64,
    pub flows_expired: u64,
    /// Unconfirmed flows placed by hash, forgotten to make room under pressure.
    pub flows_evicted: u64,
    /// Packets of unknown flows placed without being tracked: the table was under pressure and
    /// had nothing it may evict (a flood fills it so), or a FIN or RST of a connection never
    /// seen. The hash places such a flow's next packet the same way.
    pub flows_untracked: u64,
    /// TCP flows of a dead member handed to the local kernel, which resets them.
    pub flows_reset: u64,
    /// Flows of a dead member placed anew.
    pub flows_replaced: u64,
    /// Connections this node, as their entry, did not know and found the server of: from a
    /// home that taught it, or from its own directory.
    pub flows_recovered: u64,
    /// Connections nobody claimed (after the directory settled): handed to the local kernel,
    /// which answers with a RST unless it holds the connection.
    pub flows_unrecovered: u64,
    /// Packets of connections this node does not serve that an entry sent it and nobody claims
    /// (its directory settled): delivered to the local kernel, which answers RST.
    pub unclaimed_delivered: u64,
    /// Packets this node, as a flow's home, passed on to the flow's server for an entry that
    /// did not know it (the second hop).
    pub second_hop_packets: u64,
    /// Servers' claims recorded in this node's directory, and those refused (the member's
    /// quota full, or another member's fresh claim on the flow).
    pub claims_accepted: u64,
    pub claims_refused_quota: u64,
    pub claims_refused_conflict: u64,
    /// Claims not about a TCP connection to the VIP from a known member (refused).
    pub claims_refused_invalid: u64,
    /// Queries this node sent as a home without a claim (one per batch of flows, to every
    /// member), and queries it answered.
    pub queries_sent: u64,
    pub queries_answered: u64,
    /// "Served by" answers refused: from a node this entry did not ask, or naming a server
    /// that is not a live member.
    pub teach_refused: u64,
    /// New flows this node started serving (SYNs and first datagrams delivered locally,
    /// from the TUN or the carrier).
    pub served_new_flows: u64,
}

impl Counters {
    pub fn count_drop(&mut self, reason: DropReason) {
        self.count_drops(reason, 1);
    }

    /// Counts `n` packets dropped for one reason (a batch that failed as a whole).
    pub fn count_drops(&mut self, reason: DropReason, n: u64) {
        self.drops[reason.index()] += n;
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}
