//! Control messages: their encoding on the QUIC datagrams between nodes.
//!
//! Layout: a version byte, a type byte, then fields, each `id: u8, len: u16 (big-endian),
//! value`. A field whose id the decoder does not know is skipped, and so is a message type it
//! does not know ([`DecodeError::UnknownType`] is not a protocol error), so a newer node still
//! talks to an older one. Records nested in a message (a member's record, a report, a hint, a
//! load vector) are field lists of their own.
//!
//! Decoding trusts no length: every read is bounds-checked, every count capped, and every
//! number that must be finite or in a range is checked. [`encode`] refuses exactly what
//! [`decode`] refuses, so a node never sends what its peers would reject. The sender's identity
//! is not in the bytes: the control channel authenticates it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::MemberState;

/// Largest encoded message; fits a QUIC datagram on a 1280-byte path.
pub const MAX_MESSAGE: usize = 1150;
/// Longest node name.
pub const MAX_NAME: usize = 63;
/// Most reports or hints in one message.
pub const MAX_ITEMS: usize = 64;
/// The first version with field lists; older nodes (version 1) spoke a fixed layout that this
/// one refuses, and a newer version only adds fields and types.
pub const VERSION: u8 = 2;

/// What a member says of itself. Only the member itself is believed about any of this.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub name: String,
    /// Grows with every change the member makes to its record, and across restarts.
    pub incarnation: u64,
    /// `Alive`, `Draining` or `Left`: a member does not call itself suspect or dead.
    pub state: MemberState,
    /// Where carrier packets go.
    pub underlay: IpAddr,
    /// Where its control endpoint listens.
    pub control: SocketAddr,
    pub weight: f32,
    /// Fingerprint of the flow hash this node computes; members must agree on it.
    pub flow_hash: u64,
    /// The site it is in ([`DEFAULT_SITE`] from nodes that predate sites).
    pub site: String,
}

/// The site of nodes that name none.
pub const DEFAULT_SITE: &str = "default";
/// Longest site label.
pub const MAX_SITE: usize = 32;

/// Whether `site` may be a site label: 1 to 32 of a-z, 0-9, '-'.
pub fn valid_site(site: &str) -> bool {
    !site.is_empty()
        && site.len() <= MAX_SITE
        && site.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// What one member may say about another: that it did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    Suspect,
    Dead,
}

/// "`name`, at `incarnation`, did not answer me."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub name: String,
    pub incarnation: u64,
    pub kind: ReportKind,
}

/// "There is a member called `name`; its control endpoint is at `control`." Only a hint: the
/// member exists for the receiver once it has spoken for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub name: String,
    pub control: SocketAddr,
}

/// A node's own load, sent to every peer several times a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadVector {
    pub incarnation: u64,
    /// Flows this node serves (placed on it by any entry), as far as it knows.
    pub served_flows: u32,
    pub new_flows_per_sec: f32,
    /// CPU busy fraction, 0 to 1.
    pub cpu: f32,
    pub weight: f32,
    pub draining: bool,
    /// Whether it claims the VIP's layer-2 ownership (`entry.mode = "l2"`). Optional on the
    /// wire: a member that does not send it claims nothing.
    pub entry_claim: bool,
    /// It runs the layer-2 entry and could own the VIP now (ready: not draining, stopping or
    /// unhealthy). Only candidates are elected; a member that does not send it is none.
    pub entry_candidate: bool,
    /// Its app fails its health checks (`[health]`): it takes no new flows. Optional on the
    /// wire: a member that does not send it is healthy.
    pub app_unhealthy: bool,
}

/// One control message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// "Are you there?"
    Ping {
        seq: u64,
        sender: Record,
        reports: Vec<Report>,
    },
    /// Answer to a `Ping`, or relayed by a helper for the target of a `PingReq`.
    Ack {
        seq: u64,
        sender: Record,
        reports: Vec<Report>,
    },
    /// A helper's "the target of your `PingReq` did not answer me either" (Lifeguard): the
    /// asker learns that its own messages get through.
    Nack {
        seq: u64,
    },
    /// "Ping `target` for me": an indirect probe.
    PingReq {
        seq: u64,
        target: String,
    },
    /// A node introduces itself and asks who else there is.
    Join {
        sender: Record,
    },
    /// Answer to a `Join`: the answering node's record and hints of other members.
    Introduce {
        sender: Record,
        hints: Vec<Hint>,
    },
    /// A member's new record (refutation, drain, leave), sent straight to every peer; may carry
    /// reports (e.g. "I hold you suspect").
    Announce {
        sender: Record,
        reports: Vec<Report>,
    },
    Load(LoadVector),
    /// Flow recovery (see `ringlb_core::Node`'s recovery): who serves which connection.
    Flow(FlowMessage),
}

/// A client's flow to the VIP, as the client sends it: the VIP itself is implied (every
/// member owns the same one), so no message can name another destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientFlow {
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub client: IpAddr,
    pub client_port: u16,
    pub vip_port: u16,
}

/// What nodes tell each other so that any entry can find the server of any flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowMessage {
    /// "I serve these flows": from a server to the flows' home. A node speaks only for itself:
    /// there is no server field to forge.
    Serves(Vec<ClientFlow>),
    /// "The flows you sent me are served by `server`": from a home to the entry that asked.
    Teach { server: String, flows: Vec<ClientFlow> },
    /// "I (re)started: tell me again the flows whose home I am."
    Sync,
    /// "Does any of you serve these?": from a home that has no claim for a connection an entry
    /// sent it (a claim lost, or sent to another home while views differed). A member that
    /// serves some answers with `Serves`.
    Query(Vec<ClientFlow>),
}

/// Most flows in one message: with field headers IPv4 flows take 12 bytes each, IPv6 24; this
/// many IPv6 flows and a server name fit [`MAX_MESSAGE`].
pub const MAX_FLOWS: usize = 40;

/// Why bytes are not a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("message ends early")]
    Truncated,
    #[error("unsupported version {0}")]
    Version(u8),
    /// A type from a newer version: skip it.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("bad field: {0}")]
    BadField(&'static str),
    #[error("missing field: {0}")]
    Missing(&'static str),
    #[error("field given twice: {0}")]
    Duplicate(&'static str),
}

/// Why a message cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("invalid value in field {0}")]
    BadField(&'static str),
    #[error("more than {MAX_ITEMS} items")]
    TooMany,
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
}

mod ty {
    pub const PING: u8 = 1;
    pub const ACK: u8 = 2;
    pub const NACK: u8 = 3;
    pub const PING_REQ: u8 = 4;
    pub const JOIN: u8 = 5;
    pub const INTRODUCE: u8 = 6;
    pub const ANNOUNCE: u8 = 7;
    pub const LOAD: u8 = 8;
    pub const SERVES: u8 = 9;
    pub const TEACH: u8 = 10;
    pub const SYNC: u8 = 11;
    pub const QUERY: u8 = 12;
}

/// Field ids, per kind of field list.
mod id {
    // Messages.
    pub const SEQ: u8 = 1;
    pub const SENDER: u8 = 2;
    pub const REPORT: u8 = 3;
    pub const TARGET: u8 = 4;
    pub const HINT: u8 = 5;
    pub const LOAD: u8 = 6;
    pub const FLOW: u8 = 7;
    // Records, reports and hints share these.
    pub const NAME: u8 = 1;
    pub const INCARNATION: u8 = 2;
    pub const STATE: u8 = 3;
    pub const UNDERLAY: u8 = 4;
    pub const CONTROL: u8 = 5;
    pub const WEIGHT: u8 = 6;
    pub const FLOW_HASH: u8 = 7;
    pub const KIND: u8 = 8;
    pub const SITE: u8 = 9;
    // Load vectors.
    pub const SERVED: u8 = 2;
    pub const RATE: u8 = 3;
    pub const CPU: u8 = 4;
    pub const LOAD_WEIGHT: u8 = 5;
    pub const DRAINING: u8 = 6;
    pub const ENTRY_CLAIM: u8 = 7;
    pub const APP_UNHEALTHY: u8 = 8;
    pub const ENTRY_CANDIDATE: u8 = 9;
    pub const LOAD_INCARNATION: u8 = 1;
}

/// Whether `name` may be a node name on the wire.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
}

fn valid_weight(w: f32) -> bool {
    w.is_finite() && w >= 0.0
}

// ---------------------------------------------------------------------------------------------
// Encoding

struct Writer(Vec<u8>);

impl Writer {
    fn field(&mut self, id: u8, value: &[u8]) -> Result<(), EncodeError> {
        let len = u16::try_from(value.len()).map_err(|_| EncodeError::TooLong)?;
        self.0.push(id);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(value);
        Ok(())
    }
    fn nested(&mut self, id: u8, f: impl FnOnce(&mut Writer) -> Result<(), EncodeError>) -> Result<(), EncodeError> {
        let mut inner = Writer(Vec::with_capacity(64));
        f(&mut inner)?;
        self.field(id, &inner.0)
    }
    fn u64(&mut self, id: u8, v: u64) -> Result<(), EncodeError> {
        self.field(id, &v.to_be_bytes())
    }
    fn name(&mut self, id: u8, name: &str, what: &'static str) -> Result<(), EncodeError> {
        if !valid_name(name) {
            return Err(EncodeError::BadField(what));
        }
        self.field(id, name.as_bytes())
    }
    fn f32(&mut self, id: u8, v: f32, what: &'static str) -> Result<(), EncodeError> {
        if !v.is_finite() {
            return Err(EncodeError::BadField(what));
        }
        self.field(id, &v.to_be_bytes())
    }
    fn addr(&mut self, id: u8, a: IpAddr) -> Result<(), EncodeError> {
        match a {
            IpAddr::V4(a) => self.field(id, &a.octets()),
            IpAddr::V6(a) => self.field(id, &a.octets()),
        }
    }
    fn sockaddr(&mut self, id: u8, a: SocketAddr) -> Result<(), EncodeError> {
        let mut v = Vec::with_capacity(18);
        match a.ip() {
            IpAddr::V4(ip) => v.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => v.extend_from_slice(&ip.octets()),
        }
        v.extend_from_slice(&a.port().to_be_bytes());
        self.field(id, &v)
    }
    fn record(&mut self, r: &Record) -> Result<(), EncodeError> {
        let state = match r.state {
            MemberState::Alive => 0,
            MemberState::Draining => 1,
            MemberState::Left => 2,
            MemberState::Suspect | MemberState::Dead => return Err(EncodeError::BadField("state")),
        };
        if !valid_weight(r.weight) {
            return Err(EncodeError::BadField("weight"));
        }
        self.nested(id::SENDER, |w| {
            w.name(id::NAME, &r.name, "name")?;
            w.u64(id::INCARNATION, r.incarnation)?;
            w.field(id::STATE, &[state])?;
            w.addr(id::UNDERLAY, r.underlay)?;
            w.sockaddr(id::CONTROL, r.control)?;
            w.f32(id::WEIGHT, r.weight, "weight")?;
            w.u64(id::FLOW_HASH, r.flow_hash)?;
            if !valid_site(&r.site) {
                return Err(EncodeError::BadField("site"));
            }
            w.field(id::SITE, r.site.as_bytes())
        })
    }
    fn flows(&mut self, flows: &[ClientFlow]) -> Result<(), EncodeError> {
        if flows.len() > MAX_FLOWS {
            return Err(EncodeError::TooMany);
        }
        for f in flows {
            if !matches!(f.proto, 6 | 17) {
                return Err(EncodeError::BadField("flow protocol"));
            }
            let mut v = Vec::with_capacity(21);
            v.push(f.proto);
            match f.client {
                IpAddr::V4(a) => v.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => v.extend_from_slice(&a.octets()),
            }
            v.extend_from_slice(&f.client_port.to_be_bytes());
            v.extend_from_slice(&f.vip_port.to_be_bytes());
            self.field(id::FLOW, &v)?;
        }
        Ok(())
    }
    fn reports(&mut self, reports: &[Report]) -> Result<(), EncodeError> {
        if reports.len() > MAX_ITEMS {
            return Err(EncodeError::TooMany);
        }
        for r in reports {
            self.nested(id::REPORT, |w| {
                w.name(id::NAME, &r.name, "report name")?;
                w.u64(id::INCARNATION, r.incarnation)?;
                w.field(id::KIND, &[if r.kind == ReportKind::Suspect { 1 } else { 2 }])
            })?;
        }
        Ok(())
    }
}

/// Encodes `msg`, or says which field no peer would accept.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut w = Writer(Vec::with_capacity(256));
    let t = match msg {
        Message::Ping { .. } => ty::PING,
        Message::Ack { .. } => ty::ACK,
        Message::Nack { .. } => ty::NACK,
        Message::PingReq { .. } => ty::PING_REQ,
        Message::Join { .. } => ty::JOIN,
        Message::Introduce { .. } => ty::INTRODUCE,
        Message::Announce { .. } => ty::ANNOUNCE,
        Message::Load(_) => ty::LOAD,
        Message::Flow(FlowMessage::Serves(_)) => ty::SERVES,
        Message::Flow(FlowMessage::Teach { .. }) => ty::TEACH,
        Message::Flow(FlowMessage::Sync) => ty::SYNC,
        Message::Flow(FlowMessage::Query(_)) => ty::QUERY,
    };
    w.0.extend_from_slice(&[VERSION, t]);
    match msg {
        Message::Ping { seq, sender, reports } | Message::Ack { seq, sender, reports } => {
            w.u64(id::SEQ, *seq)?;
            w.record(sender)?;
            w.reports(reports)?;
        }
        Message::Nack { seq } => w.u64(id::SEQ, *seq)?,
        Message::PingReq { seq, target } => {
            w.u64(id::SEQ, *seq)?;
            w.name(id::TARGET, target, "target")?;
        }
        Message::Join { sender } => w.record(sender)?,
        Message::Introduce { sender, hints } => {
            w.record(sender)?;
            if hints.len() > MAX_ITEMS {
                return Err(EncodeError::TooMany);
            }
            for h in hints {
                w.nested(id::HINT, |w| {
                    w.name(id::NAME, &h.name, "hint name")?;
                    w.sockaddr(id::CONTROL, h.control)
                })?;
            }
        }
        Message::Announce { sender, reports } => {
            w.record(sender)?;
            w.reports(reports)?;
        }
        Message::Load(l) => {
            if !valid_weight(l.weight) {
                return Err(EncodeError::BadField("load weight"));
            }
            w.nested(id::LOAD, |w| {
                w.u64(id::LOAD_INCARNATION, l.incarnation)?;
                w.field(id::SERVED, &l.served_flows.to_be_bytes())?;
                w.f32(id::RATE, l.new_flows_per_sec, "new flows per second")?;
                w.f32(id::CPU, l.cpu, "cpu")?;
                w.f32(id::LOAD_WEIGHT, l.weight, "load weight")?;
                w.field(id::DRAINING, &[u8::from(l.draining)])?;
                if l.entry_claim {
                    w.field(id::ENTRY_CLAIM, &[1])?;
                }
                if l.entry_candidate {
                    w.field(id::ENTRY_CANDIDATE, &[1])?;
                }
                if l.app_unhealthy {
                    w.field(id::APP_UNHEALTHY, &[1])?;
                }
                Ok(())
            })?;
        }
        Message::Flow(FlowMessage::Serves(flows) | FlowMessage::Query(flows)) => w.flows(flows)?,
        Message::Flow(FlowMessage::Teach { server, flows }) => {
            w.name(id::TARGET, server, "server")?;
            w.flows(flows)?;
        }
        Message::Flow(FlowMessage::Sync) => {}
    }
    if w.0.len() > MAX_MESSAGE {
        return Err(EncodeError::TooLong);
    }
    Ok(w.0)
}

/// Encoded size of a message carrying only `sender`'s record and `reports`, to pack reports.
pub fn encoded_report_len(r: &Report) -> usize {
    // Field header of the report, then name, incarnation and kind fields.
    3 + (3 + r.name.len()) + (3 + 8) + (3 + 1)
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// A field list: yields `(id, value)` pairs.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u8, &'a [u8]), DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let Some((&[id, a, b], rest)) = self.0.split_first_chunk::<3>() else {
            self.0 = &[];
            return Some(Err(DecodeError::Truncated));
        };
        let len = usize::from(u16::from_be_bytes([a, b]));
        if rest.len() < len {
            self.0 = &[];
            return Some(Err(DecodeError::Truncated));
        }
        let (value, rest) = rest.split_at(len);
        self.0 = rest;
        Some(Ok((id, value)))
    }
}

/// Sets a field once; a second occurrence is an error.
fn once<T>(slot: &mut Option<T>, v: T, what: &'static str) -> Result<(), DecodeError> {
    if slot.replace(v).is_some() {
        return Err(DecodeError::Duplicate(what));
    }
    Ok(())
}

fn need<T>(slot: Option<T>, what: &'static str) -> Result<T, DecodeError> {
    slot.ok_or(DecodeError::Missing(what))
}

fn u64_of(v: &[u8], what: &'static str) -> Result<u64, DecodeError> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| DecodeError::BadField(what))?))
}

fn f32_of(v: &[u8], what: &'static str) -> Result<f32, DecodeError> {
    let x = f32::from_be_bytes(v.try_into().map_err(|_| DecodeError::BadField(what))?);
    if x.is_finite() {
        Ok(x)
    } else {
        Err(DecodeError::BadField(what))
    }
}

fn name_of(v: &[u8], what: &'static str) -> Result<String, DecodeError> {
    let s = std::str::from_utf8(v).map_err(|_| DecodeError::BadField(what))?;
    if !valid_name(s) {
        return Err(DecodeError::BadField(what));
    }
    Ok(s.to_owned())
}

fn addr_of(v: &[u8], what: &'static str) -> Result<IpAddr, DecodeError> {
    match v.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).map_err(|_| DecodeError::BadField(what))?))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).map_err(|_| DecodeError::BadField(what))?))),
        _ => Err(DecodeError::BadField(what)),
    }
}

fn sockaddr_of(v: &[u8], what: &'static str) -> Result<SocketAddr, DecodeError> {
    if v.len() < 2 {
        return Err(DecodeError::BadField(what));
    }
    let (ip, port) = v.split_at(v.len() - 2);
    Ok(SocketAddr::new(addr_of(ip, what)?, u16::from_be_bytes([port[0], port[1]])))
}

fn record_of(v: &[u8]) -> Result<Record, DecodeError> {
    let (mut name, mut inc, mut state, mut underlay, mut control, mut weight, mut hash) =
        (None, None, None, None, None, None, None);
    let mut site = None;
    for f in Fields(v) {
        let (fid, v) = f?;
        match fid {
            id::NAME => once(&mut name, name_of(v, "name")?, "name")?,
            id::INCARNATION => once(&mut inc, u64_of(v, "incarnation")?, "incarnation")?,
            id::STATE => {
                let s = match v {
                    [0] => MemberState::Alive,
                    [1] => MemberState::Draining,
                    [2] => MemberState::Left,
                    _ => return Err(DecodeError::BadField("state")),
                };
                once(&mut state, s, "state")?;
            }
            id::UNDERLAY => once(&mut underlay, addr_of(v, "underlay")?, "underlay")?,
            id::CONTROL => once(&mut control, sockaddr_of(v, "control")?, "control")?,
            id::WEIGHT => {
                let w = f32_of(v, "weight")?;
                if !valid_weight(w) {
                    return Err(DecodeError::BadField("weight"));
                }
                once(&mut weight, w, "weight")?;
            }
            id::FLOW_HASH => once(&mut hash, u64_of(v, "flow hash")?, "flow hash")?,
            id::SITE => {
                let s = std::str::from_utf8(v).ok().filter(|s| valid_site(s)).ok_or(DecodeError::BadField("site"))?;
                once(&mut site, s.to_owned(), "site")?;
            }
            _ => {}
        }
    }
    Ok(Record {
        site: site.unwrap_or_else(|| DEFAULT_SITE.to_owned()),
        name: need(name, "name")?,
        incarnation: need(inc, "incarnation")?,
        state: need(state, "state")?,
        underlay: need(underlay, "underlay")?,
        control: need(control, "control")?,
        weight: need(weight, "weight")?,
        flow_hash: need(hash, "flow hash")?,
    })
}

fn report_of(v: &[u8]) -> Result<Report, DecodeError> {
    let (mut name, mut inc, mut kind) = (None, None, None);
    for f in Fields(v) {
        let (fid, v) = f?;
        match fid {
            id::NAME => once(&mut name, name_of(v, "report name")?, "report name")?,
            id::INCARNATION => once(&mut inc, u64_of(v, "report incarnation")?, "report incarnation")?,
            id::KIND => {
                let k = match v {
                    [1] => ReportKind::Suspect,
                    [2] => ReportKind::Dead,
                    _ => return Err(DecodeError::BadField("report kind")),
                };
                once(&mut kind, k, "report kind")?;
            }
            _ => {}
        }
    }
    Ok(Report {
        name: need(name, "report name")?,
        incarnation: need(inc, "report incarnation")?,
        kind: need(kind, "report kind")?,
    })
}

fn hint_of(v: &[u8]) -> Result<Hint, DecodeError> {
    let (mut name, mut control) = (None, None);
    for f in Fields(v) {
        let (fid, v) = f?;
        match fid {
            id::NAME => once(&mut name, name_of(v, "hint name")?, "hint name")?,
            id::CONTROL => once(&mut control, sockaddr_of(v, "hint control")?, "hint control")?,
            _ => {}
        }
    }
    Ok(Hint { name: need(name, "hint name")?, control: need(control, "hint control")? })
}

/// A one-byte flag: 0 or 1, nothing else.
fn bool_of(v: &[u8], what: &'static str) -> Result<bool, DecodeError> {
    match v {
        [0] => Ok(false),
        [1] => Ok(true),
        _ => Err(DecodeError::BadField(what)),
    }
}

fn load_of(v: &[u8]) -> Result<LoadVector, DecodeError> {
    let (mut inc, mut served, mut rate, mut cpu, mut weight, mut draining) = (None, None, None, None, None, None);
    let (mut entry_claim, mut app_unhealthy, mut entry_candidate) = (None, None, None);
    for f in Fields(v) {
        let (fid, v) = f?;
        match fid {
            id::LOAD_INCARNATION => once(&mut inc, u64_of(v, "load incarnation")?, "load incarnation")?,
            id::SERVED => {
                let s = u32::from_be_bytes(v.try_into().map_err(|_| DecodeError::BadField("served flows"))?);
                once(&mut served, s, "served flows")?;
            }
            id::RATE => once(&mut rate, f32_of(v, "new flows per second")?, "new flows per second")?,
            id::CPU => once(&mut cpu, f32_of(v, "cpu")?, "cpu")?,
            id::LOAD_WEIGHT => {
                let w = f32_of(v, "load weight")?;
                if !valid_weight(w) {
                    return Err(DecodeError::BadField("load weight"));
                }
                once(&mut weight, w, "load weight")?;
            }
            id::DRAINING => once(&mut draining, bool_of(v, "draining")?, "draining")?,
            id::ENTRY_CLAIM => once(&mut entry_claim, bool_of(v, "entry claim")?, "entry claim")?,
            id::ENTRY_CANDIDATE => once(&mut entry_candidate, bool_of(v, "entry candidate")?, "entry candidate")?,
            id::APP_UNHEALTHY => once(&mut app_unhealthy, bool_of(v, "app unhealthy")?, "app unhealthy")?,
            _ => {}
        }
    }
    Ok(LoadVector {
        incarnation: need(inc, "load incarnation")?,
        served_flows: need(served, "served flows")?,
        new_flows_per_sec: need(rate, "new flows per second")?,
        cpu: need(cpu, "cpu")?,
        weight: need(weight, "load weight")?,
        draining: need(draining, "draining")?,
        entry_claim: entry_claim.unwrap_or(false),
        entry_candidate: entry_candidate.unwrap_or(false),
        app_unhealthy: app_unhealthy.unwrap_or(false),
    })
}

fn flow_of(v: &[u8]) -> Result<ClientFlow, DecodeError> {
    let bad = DecodeError::BadField("flow");
    let (&proto, rest) = v.split_first().ok_or(bad)?;
    if !matches!(proto, 6 | 17) || !matches!(rest.len(), 8 | 20) {
        return Err(bad);
    }
    let (addr, ports) = rest.split_at(rest.len() - 4);
    Ok(ClientFlow {
        proto,
        client: addr_of(addr, "flow")?,
        client_port: u16::from_be_bytes([ports[0], ports[1]]),
        vip_port: u16::from_be_bytes([ports[2], ports[3]]),
    })
}

/// Decodes one message. [`DecodeError::UnknownType`] means a newer peer sent something this
/// node does not know: ignore it rather than treat the peer as broken.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(DecodeError::TooLong);
    }
    let Some((&[version, t], body)) = bytes.split_first_chunk::<2>() else {
        return Err(DecodeError::Truncated);
    };
    if version < VERSION {
        return Err(DecodeError::Version(version));
    }
    if !(ty::PING..=ty::QUERY).contains(&t) {
        return Err(DecodeError::UnknownType(t));
    }
    let (mut seq, mut sender, mut target, mut load) = (None, None, None, None);
    let (mut reports, mut hints, mut flows) = (Vec::new(), Vec::new(), Vec::new());
    for f in Fields(body) {
        let (fid, v) = f?;
        match fid {
            id::SEQ => once(&mut seq, u64_of(v, "seq")?, "seq")?,
            id::SENDER => once(&mut sender, record_of(v)?, "sender")?,
            id::REPORT => {
                if reports.len() == MAX_ITEMS {
                    return Err(DecodeError::BadField("too many reports"));
                }
                reports.push(report_of(v)?);
            }
            id::TARGET => once(&mut target, name_of(v, "target")?, "target")?,
            id::HINT => {
                if hints.len() == MAX_ITEMS {
                    return Err(DecodeError::BadField("too many hints"));
                }
                hints.push(hint_of(v)?);
            }
            id::LOAD => once(&mut load, load_of(v)?, "load")?,
            id::FLOW => {
                if flows.len() == MAX_FLOWS {
                    return Err(DecodeError::BadField("too many flows"));
                }
                flows.push(flow_of(v)?);
            }
            _ => {}
        }
    }
    Ok(match t {
        ty::PING => Message::Ping { seq: need(seq, "seq")?, sender: need(sender, "sender")?, reports },
        ty::ACK => Message::Ack { seq: need(seq, "seq")?, sender: need(sender, "sender")?, reports },
        ty::NACK => Message::Nack { seq: need(seq, "seq")? },
        ty::PING_REQ => Message::PingReq { seq: need(seq, "seq")?, target: need(target, "target")? },
        ty::JOIN => Message::Join { sender: need(sender, "sender")? },
        ty::INTRODUCE => Message::Introduce { sender: need(sender, "sender")?, hints },
        ty::ANNOUNCE => Message::Announce { sender: need(sender, "sender")?, reports },
        ty::LOAD => Message::Load(need(load, "load")?),
        ty::SERVES => Message::Flow(FlowMessage::Serves(flows)),
        ty::TEACH => Message::Flow(FlowMessage::Teach { server: need(target, "server")?, flows }),
        ty::SYNC => Message::Flow(FlowMessage::Sync),
        _ => Message::Flow(FlowMessage::Query(flows)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(name: &str, incarnation: u64) -> Record {
        Record {
            name: name.into(),
            incarnation,
            state: MemberState::Alive,
            underlay: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
            control: "10.0.0.7:6636".parse().unwrap(),
            weight: 1.0,
            flow_hash: 42,
            site: "a".into(),
        }
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            "[a-z][a-z0-9-]{0,20}",
            any::<u64>(),
            0u8..3,
            any::<[u8; 4]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            0.0f32..1e6,
            (any::<u64>(), "[a-z0-9-]{1,32}"),
        )
            .prop_map(|(name, incarnation, s, v4, v6, port, weight, (flow_hash, site))| Record {
                site,
                name,
                incarnation,
                state: [MemberState::Alive, MemberState::Draining, MemberState::Left][usize::from(s)],
                underlay: IpAddr::V4(v4.into()),
                control: SocketAddr::new(IpAddr::V6(v6.into()), port),
                weight,
                flow_hash,
            })
    }

    fn arb_report() -> impl Strategy<Value = Report> {
        ("[a-z][a-z0-9-]{0,20}", any::<u64>(), any::<bool>()).prop_map(|(name, incarnation, s)| Report {
            name,
            incarnation,
            kind: if s { ReportKind::Suspect } else { ReportKind::Dead },
        })
    }

    fn arb_flow() -> impl Strategy<Value = ClientFlow> {
        (any::<bool>(), any::<bool>(), any::<[u8; 16]>(), any::<u16>(), any::<u16>()).prop_map(
            |(tcp, v4, a, cp, vp)| {
                let client =
                    if v4 { IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])) } else { IpAddr::V6(Ipv6Addr::from(a)) };
                ClientFlow { proto: if tcp { 6 } else { 17 }, client, client_port: cp, vip_port: vp }
            },
        )
    }

    proptest! {
        #[test]
        fn round_trip(seq in any::<u64>(), sender in arb_record(), reports in proptest::collection::vec(arb_report(), 0..12), flows in proptest::collection::vec(arb_flow(), 0..MAX_FLOWS), kind in 0u8..12) {
            let hints = reports.iter().map(|r| Hint { name: r.name.clone(), control: sender.control }).collect();
            let msg = match kind {
                0 => Message::Ping { seq, sender, reports },
                1 => Message::Ack { seq, sender, reports },
                2 => Message::Nack { seq },
                3 => Message::PingReq { seq, target: sender.name },
                4 => Message::Join { sender },
                5 => Message::Introduce { sender, hints },
                6 => Message::Announce { sender, reports },
                7 => Message::Load(LoadVector { incarnation: seq, served_flows: 7, new_flows_per_sec: 1.5, cpu: 0.25, weight: 2.0, draining: true, entry_claim: seq % 2 == 0, entry_candidate: seq % 5 == 0, app_unhealthy: seq % 3 == 0 }),
                8 => Message::Flow(FlowMessage::Serves(flows)),
                9 => Message::Flow(FlowMessage::Teach { server: sender.name, flows }),
                10 => Message::Flow(FlowMessage::Sync),
                _ => Message::Flow(FlowMessage::Query(flows)),
            };
            let bytes = encode(&msg).expect("fits");
            prop_assert_eq!(decode(&bytes), Ok(msg));
        }

        #[test]
        fn decode_never_panics_and_what_it_accepts_encodes_back(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            if let Ok(msg) = decode(&bytes) {
                let again = encode(&msg).expect("a decoded message encodes");
                prop_assert_eq!(decode(&again), Ok(msg));
            }
        }
    }

    #[test]
    fn refuses_lies() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[1, 1]), Err(DecodeError::Version(1)), "the fixed layout of version 1");
        assert_eq!(decode(&[2, 77]), Err(DecodeError::UnknownType(77)));
        assert_eq!(decode(&vec![2; 2000]), Err(DecodeError::TooLong));
        assert_eq!(decode(&[2, ty::NACK, id::SEQ, 0, 200]), Err(DecodeError::Truncated), "length beyond the bytes");
        assert_eq!(decode(&[2, ty::NACK]), Err(DecodeError::Missing("seq")));
        let mut twice = encode(&Message::Nack { seq: 1 }).unwrap();
        twice.extend_from_slice(&[id::SEQ, 0, 8, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(decode(&twice), Err(DecodeError::Duplicate("seq")));
        let bad_name = [2, ty::PING_REQ, id::SEQ, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1, id::TARGET, 0, 2, b'n', b' '];
        assert_eq!(decode(&bad_name), Err(DecodeError::BadField("target")));
    }

    #[test]
    fn a_load_vector_without_an_entry_claim_claims_nothing() {
        let load = LoadVector {
            incarnation: 3,
            served_flows: 1,
            new_flows_per_sec: 0.0,
            cpu: 0.5,
            weight: 1.0,
            draining: false,
            entry_claim: false,
            entry_candidate: false,
            app_unhealthy: false,
        };
        let plain = encode(&Message::Load(load)).unwrap();
        let claiming = encode(&Message::Load(LoadVector { entry_claim: true, ..load })).unwrap();
        // A member of the previous release sends no claim field at all.
        assert_eq!(claiming.len(), plain.len() + 4);
        assert_eq!(decode(&plain), Ok(Message::Load(load)));
        assert_eq!(decode(&claiming), Ok(Message::Load(LoadVector { entry_claim: true, ..load })));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut bytes = encode(&Message::Nack { seq: 9 }).unwrap();
        bytes.extend_from_slice(&[200, 0, 3, 1, 2, 3]);
        assert_eq!(decode(&bytes), Ok(Message::Nack { seq: 9 }));
    }

    #[test]
    fn encode_refuses_what_decode_refuses() {
        for w in [-1.0, f32::NAN, f32::INFINITY] {
            let mut r = record("n1", 1);
            r.weight = w;
            assert_eq!(encode(&Message::Join { sender: r }), Err(EncodeError::BadField("weight")), "weight {w}");
            let load = LoadVector {
                incarnation: 1,
                served_flows: 0,
                new_flows_per_sec: 0.0,
                cpu: 0.0,
                weight: w,
                draining: false,
                entry_claim: false,
                entry_candidate: false,
                app_unhealthy: false,
            };
            assert!(encode(&Message::Load(load)).is_err(), "load weight {w}");
        }
        let mut r = record("n1", 1);
        r.state = MemberState::Dead;
        assert_eq!(encode(&Message::Join { sender: r }), Err(EncodeError::BadField("state")));
        assert_eq!(encode(&Message::PingReq { seq: 1, target: "a b".into() }), Err(EncodeError::BadField("target")));
    }

    #[test]
    fn report_len_matches_encoding() {
        let r = Report { name: "node-7".into(), incarnation: 3, kind: ReportKind::Suspect };
        let one = encode(&Message::Announce { sender: record("a", 1), reports: vec![r.clone()] }).unwrap();
        let none = encode(&Message::Announce { sender: record("a", 1), reports: vec![] }).unwrap();
        assert_eq!(one.len() - none.len(), encoded_report_len(&r));
    }
}
