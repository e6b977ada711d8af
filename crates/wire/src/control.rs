//! Control-plane messages: membership (SWIM-style probes and gossip) and load vectors.
//!
//! Encoded by hand into at most [`MAX_MESSAGE`] bytes so that every message fits one QUIC
//! datagram. Decoding never trusts a length: every read is bounds-checked, every count capped,
//! and trailing bytes are an error. The sender's identity is not in the message: the control
//! channel authenticates it (its TLS certificate names the node).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Largest encoded message; fits a QUIC datagram on a 1280-byte path.
pub const MAX_MESSAGE: usize = 1150;
/// Longest node name.
pub const MAX_NAME: usize = 63;
const VERSION: u8 = 1;

/// What one node says about a member (itself included).
#[derive(Debug, Clone, PartialEq)]
pub struct MemberUpdate {
    pub name: String,
    pub incarnation: u64,
    pub state: UpdateState,
    /// Where carrier packets go.
    pub underlay: IpAddr,
    /// Where the control endpoint listens.
    pub control: SocketAddr,
    pub weight: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateState {
    Alive,
    Suspect,
    Dead,
    /// Left on purpose.
    Left,
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
}

/// One control message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// "Are you there?" Carries gossip.
    Ping {
        seq: u64,
        gossip: Vec<MemberUpdate>,
    },
    /// Answer to a `Ping`, or relayed on behalf of the target of a `PingReq`.
    Ack {
        seq: u64,
        gossip: Vec<MemberUpdate>,
    },
    /// "Ping `target` for me": an indirect probe.
    PingReq {
        seq: u64,
        target: String,
    },
    /// A new node introduces itself (first of `gossip` is itself) and asks for the members.
    Join {
        gossip: Vec<MemberUpdate>,
    },
    /// Members, in answer to `Join` (possibly several messages).
    Members {
        gossip: Vec<MemberUpdate>,
    },
    Load(LoadVector),
}

/// Why bytes are not a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("message ends early")]
    Truncated,
    #[error("unknown version {0}")]
    Version(u8),
    #[error("unknown message type {0}")]
    Type(u8),
    #[error("bad field")]
    BadField,
    #[error("bytes after the message")]
    Trailing,
}

/// Encodes `msg`; `None` when it would exceed [`MAX_MESSAGE`] (split the gossip then).
pub fn encode(msg: &Message) -> Option<Vec<u8>> {
    let mut b = Vec::with_capacity(256);
    b.push(VERSION);
    match msg {
        Message::Ping { seq, gossip } => {
            b.push(1);
            b.extend_from_slice(&seq.to_be_bytes());
            put_updates(&mut b, gossip)?;
        }
        Message::Ack { seq, gossip } => {
            b.push(2);
            b.extend_from_slice(&seq.to_be_bytes());
            put_updates(&mut b, gossip)?;
        }
        Message::PingReq { seq, target } => {
            b.push(3);
            b.extend_from_slice(&seq.to_be_bytes());
            put_name(&mut b, target)?;
        }
        Message::Join { gossip } => {
            b.push(4);
            put_updates(&mut b, gossip)?;
        }
        Message::Members { gossip } => {
            b.push(5);
            put_updates(&mut b, gossip)?;
        }
        Message::Load(l) => {
            b.push(6);
            b.extend_from_slice(&l.incarnation.to_be_bytes());
            b.extend_from_slice(&l.served_flows.to_be_bytes());
            b.extend_from_slice(&l.new_flows_per_sec.to_be_bytes());
            b.extend_from_slice(&l.cpu.to_be_bytes());
            b.extend_from_slice(&l.weight.to_be_bytes());
            b.push(u8::from(l.draining));
        }
    }
    (b.len() <= MAX_MESSAGE).then_some(b)
}

/// Encoded size of one update, to pack gossip into messages.
pub fn update_len(u: &MemberUpdate) -> usize {
    let addr = |a: IpAddr| if a.is_ipv4() { 5 } else { 17 };
    1 + u.name.len() + 8 + 1 + addr(u.underlay) + addr(u.control.ip()) + 2 + 4
}

fn put_name(b: &mut Vec<u8>, name: &str) -> Option<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        return None;
    }
    b.push(u8::try_from(name.len()).ok()?);
    b.extend_from_slice(name.as_bytes());
    Some(())
}

fn put_addr(b: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => {
            b.push(4);
            b.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            b.push(6);
            b.extend_from_slice(&a.octets());
        }
    }
}

fn put_updates(b: &mut Vec<u8>, updates: &[MemberUpdate]) -> Option<()> {
    b.push(u8::try_from(updates.len()).ok()?);
    for u in updates {
        put_name(b, &u.name)?;
        b.extend_from_slice(&u.incarnation.to_be_bytes());
        b.push(match u.state {
            UpdateState::Alive => 0,
            UpdateState::Suspect => 1,
            UpdateState::Dead => 2,
            UpdateState::Left => 3,
        });
        put_addr(b, u.underlay);
        put_addr(b, u.control.ip());
        b.extend_from_slice(&u.control.port().to_be_bytes());
        b.extend_from_slice(&u.weight.to_be_bytes());
    }
    Some(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Truncated)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn f32(&mut self) -> Result<f32, DecodeError> {
        let v = f32::from_be_bytes(self.array()?);
        if v.is_finite() {
            Ok(v)
        } else {
            Err(DecodeError::BadField)
        }
    }
    fn name(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        if len == 0 || len > MAX_NAME {
            return Err(DecodeError::BadField);
        }
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::BadField)?;
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
            return Err(DecodeError::BadField);
        }
        Ok(s.to_owned())
    }
    fn addr(&mut self) -> Result<IpAddr, DecodeError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            _ => Err(DecodeError::BadField),
        }
    }
    fn updates(&mut self) -> Result<Vec<MemberUpdate>, DecodeError> {
        let n = usize::from(self.u8()?);
        // Each update takes at least 22 bytes: a count beyond what is left is a lie.
        if n * 22 > self.0.len() {
            return Err(DecodeError::Truncated);
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.name()?;
            let incarnation = self.u64()?;
            let state = match self.u8()? {
                0 => UpdateState::Alive,
                1 => UpdateState::Suspect,
                2 => UpdateState::Dead,
                3 => UpdateState::Left,
                _ => return Err(DecodeError::BadField),
            };
            let underlay = self.addr()?;
            let control = SocketAddr::new(self.addr()?, u16::from_be_bytes(self.array()?));
            let weight = self.f32()?;
            if weight < 0.0 {
                return Err(DecodeError::BadField);
            }
            v.push(MemberUpdate { name, incarnation, state, underlay, control, weight });
        }
        Ok(v)
    }
}

/// Decodes one message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(DecodeError::TooLong);
    }
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let msg = match r.u8()? {
        1 => Message::Ping { seq: r.u64()?, gossip: r.updates()? },
        2 => Message::Ack { seq: r.u64()?, gossip: r.updates()? },
        3 => Message::PingReq { seq: r.u64()?, target: r.name()? },
        4 => Message::Join { gossip: r.updates()? },
        5 => Message::Members { gossip: r.updates()? },
        6 => {
            let incarnation = r.u64()?;
            let served_flows = r.u32()?;
            let new_flows_per_sec = r.f32()?;
            let cpu = r.f32()?;
            let weight = r.f32()?;
            let draining = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::BadField),
            };
            Message::Load(LoadVector { incarnation, served_flows, new_flows_per_sec, cpu, weight, draining })
        }
        t => return Err(DecodeError::Type(t)),
    };
    if !r.0.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn update() -> impl Strategy<Value = MemberUpdate> {
        ("[a-z][a-z0-9-]{0,20}", any::<u64>(), 0u8..4, any::<[u8; 4]>(), any::<u16>(), 0.0f32..100.0).prop_map(
            |(name, incarnation, s, ip, port, weight)| MemberUpdate {
                name,
                incarnation,
                state: [UpdateState::Alive, UpdateState::Suspect, UpdateState::Dead, UpdateState::Left][usize::from(s)],
                underlay: IpAddr::V4(ip.into()),
                control: SocketAddr::new(IpAddr::V4(ip.into()), port),
                weight,
            },
        )
    }

    proptest! {
        #[test]
        fn round_trip(seq in any::<u64>(), gossip in proptest::collection::vec(update(), 0..20), kind in 0u8..6) {
            let msg = match kind {
                0 => Message::Ping { seq, gossip },
                1 => Message::Ack { seq, gossip },
                2 => Message::PingReq { seq, target: "n-1".into() },
                3 => Message::Join { gossip },
                4 => Message::Members { gossip },
                _ => Message::Load(LoadVector { incarnation: seq, served_flows: 7, new_flows_per_sec: 1.5, cpu: 0.25, weight: 2.0, draining: true }),
            };
            if let Some(bytes) = encode(&msg) {
                prop_assert_eq!(decode(&bytes), Ok(msg));
            } else {
                // Only gossip too big for one datagram may fail to encode.
                let gossip_only = !matches!(msg, Message::PingReq { .. } | Message::Load(_));
                prop_assert!(gossip_only, "non-gossip message failed to encode");
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn update_len_matches_encoding() {
        let u = MemberUpdate {
            name: "node-7".into(),
            incarnation: 3,
            state: UpdateState::Alive,
            underlay: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
            control: "10.0.0.7:6636".parse().unwrap(),
            weight: 1.0,
        };
        let bytes = encode(&Message::Members { gossip: vec![u.clone()] }).unwrap();
        assert_eq!(bytes.len(), 3 + update_len(&u));
    }

    #[test]
    fn refuses_lies() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[9, 1]), Err(DecodeError::Version(9)));
        assert_eq!(decode(&[1, 77]), Err(DecodeError::Type(77)));
        assert_eq!(decode(&[1, 4, 200]), Err(DecodeError::Truncated), "count beyond the bytes");
        assert_eq!(decode(&vec![1; 2000]), Err(DecodeError::TooLong));
        let mut ok = encode(&Message::PingReq { seq: 1, target: "n2".into() }).unwrap();
        ok.push(0);
        assert_eq!(decode(&ok), Err(DecodeError::Trailing));
        let bad_name = [1, 3, 0, 0, 0, 0, 0, 0, 0, 1, 2, b'n', b' '];
        assert_eq!(decode(&bad_name), Err(DecodeError::BadField));
    }
}
