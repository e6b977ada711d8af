//! The sealed carrier: IP-in-UDP whose payload is encrypted and authenticated (AES-256-GCM),
//! with keys from the mutually authenticated QUIC sessions between members.
//!
//! **Keys.** Each direction between two members has its own secret: the TLS exporter (RFC 8446
//! §7.5) of the QUIC connection the sender opened to the receiver, which both ends of that one
//! connection compute alike and nobody else can. The driver hands it to [`CarrierKeys::install`]
//! under the peer's certificate name, and the member's underlay address (which its certificate
//! vouches for) is bound to it with [`CarrierKeys::bind`]. Packet keys come from the secret by
//! HKDF, one per *epoch*: the sender moves to the next epoch after `key_lifetime` or
//! `key_packets` packets; the receiver follows the first packet that authenticates under the
//! next epoch and keeps the previous key for `overlap` (reordering), then retires it. A new QUIC
//! session (a reconnection, a restart) brings a new secret: the sender keeps the old one for
//! [`SWITCH_DELAY`] so that the receiver has the new one before it is used, and the receiver
//! keeps the old one for `overlap`.
//!
//! **Packets.** `[0x01, 0, 0, 0][key id: u32][counter: u64]` then the sealed inner packet and
//! its 16-byte tag. The first byte's high nibble is 0, never an IP version, so a receiver tells
//! sealed from plaintext carrier packets by it. The header is the AEAD's associated data; the
//! nonce is the counter, which never repeats under one key. A replay window (RFC 6479) of
//! [`REPLAY_WINDOW`] packets per key refuses repeats.
//!
//! Every refusal has an [`OpenError`], which the driver counts by reason.

use std::net::IpAddr;
use std::time::Duration;

use hashbrown::HashMap;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;

use crate::Timestamp;

/// Bytes in front of the sealed inner packet.
pub const HEADER: usize = 16;
/// Bytes of authentication tag after it.
pub const TAG: usize = 16;
/// What sealing adds to each inner packet.
pub const OVERHEAD: usize = HEADER + TAG;
const TYPE_SEALED_V1: u8 = 0x01;
/// How long a sender keeps using a session's secret after a newer one arrives.
pub const SWITCH_DELAY: Duration = Duration::from_secs(1);
/// Packets a receiver may see out of order per key before an old counter counts as a replay.
pub const REPLAY_WINDOW: u64 = (BLOCKS as u64 - 1) * 64;
const BLOCKS: usize = 256;
/// Sessions a receiver holds per peer: the one in use and newer ones not yet used (both ends
/// may finish a reconnection's handshakes in either order).
const MAX_SESSIONS: usize = 3;
/// Retired key ids remembered per peer, so that late packets under them count as stale.
const RETIRED_REMEMBERED: usize = 8;
/// Epochs a receiver derives ahead of the newest it has seen: a sender that moved on while all
/// its packets of an epoch were lost (a cut link) is still understood.
const LOOKAHEAD: u32 = 3;

/// Whether a carrier payload is sealed (its first nibble is no IP version).
pub fn is_sealed(payload: &[u8]) -> bool {
    payload.first().is_some_and(|b| b >> 4 == 0)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SealConfig {
    /// A key's longest use before the sender moves to the next epoch.
    pub key_lifetime: Duration,
    /// Most packets under one key.
    pub key_packets: u64,
    /// How long a receiver keeps a replaced key (epoch or session).
    pub overlap: Duration,
}

impl Default for SealConfig {
    fn default() -> Self {
        SealConfig { key_lifetime: Duration::from_secs(120), key_packets: 1 << 30, overlap: Duration::from_secs(10) }
    }
}

/// Which way a secret protects packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From this node to the peer (the connection this node opened).
    Send,
    /// From the peer to this node (the connection the peer opened).
    Receive,
}

/// 32 bytes of exporter output; never printed (compared only in tests and event plumbing, never
/// to authenticate anything).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a received carrier packet was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Shorter than header and tag, or an unknown type.
    Malformed,
    /// No key from this sender (not a member with a session, or a key id never issued).
    NoKey,
    /// A key this node has retired.
    StaleKey,
    /// A counter already seen, or older than the replay window.
    Replayed,
    /// It does not authenticate: forged or corrupted.
    Forged,
}

/// Why a packet could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// No session with this peer yet.
    NoKey,
    /// The output buffer is too small.
    TooBig,
}

/// Counts of what the keys did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SealStats {
    pub sealed: u64,
    pub opened: u64,
    /// Epoch changes this node made as a sender.
    pub rotations: u64,
    /// Secrets installed (one per QUIC session and direction).
    pub sessions: u64,
}

struct EpochKey {
    epoch: u32,
    id: u32,
    key: LessSafeKey,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(secret: &Secret, epoch: u32) -> EpochKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ringlb sealed carrier v1").extract(&secret.0);
    let info = epoch.to_be_bytes();
    let parts: [&[u8]; 2] = [b"key", &info];
    let mut out = [0u8; 36];
    // 36 bytes are far below HKDF-SHA256's limit of 255 × 32: neither call can fail.
    let okm = prk.expand(&parts, Len(out.len())).expect("HKDF output length within bounds");
    okm.fill(&mut out).expect("HKDF fill of the requested length");
    let key = UnboundKey::new(&AES_256_GCM, &out[..32]).expect("32 bytes is an AES-256 key");
    EpochKey { epoch, id: u32::from_be_bytes([out[32], out[33], out[34], out[35]]), key: LessSafeKey::new(key) }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// RFC 6479's sliding window: a bitmap of `BLOCKS` × 64 counters, one block of which is
/// always being cleared ahead of the newest.
struct ReplayWindow {
    last: u64,
    bits: Box<[u64; BLOCKS]>,
}

impl ReplayWindow {
    fn new() -> Self {
        ReplayWindow { last: 0, bits: Box::new([0; BLOCKS]) }
    }

    fn block(counter: u64) -> usize {
        // The modulus keeps the index below BLOCKS.
        usize::try_from((counter / 64) % BLOCKS as u64).unwrap_or(0)
    }

    fn accepts(&self, counter: u64) -> bool {
        if counter > self.last {
            return true;
        }
        if self.last - counter >= REPLAY_WINDOW {
            return false;
        }
        self.bits[Self::block(counter)] & (1 << (counter % 64)) == 0
    }

    /// Marks `counter` seen; call only after [`ReplayWindow::accepts`] and authentication.
    fn mark(&mut self, counter: u64) {
        if counter > self.last {
            let (from, to) = (self.last / 64, counter / 64);
            let clear = (to - from).min(BLOCKS as u64);
            for i in 1..=clear {
                self.bits[Self::block((from + i) * 64)] = 0;
            }
            self.last = counter;
        }
        self.bits[Self::block(counter)] |= 1 << (counter % 64);
    }
}

struct Sender {
    secret: Secret,
    key: EpochKey,
    counter: u64,
    since: Timestamp,
}

impl Sender {
    fn new(secret: Secret, now: Timestamp) -> Self {
        Sender { key: derive(&secret, 0), secret, counter: 0, since: now }
    }
}

struct ReceiveEpoch {
    key: EpochKey,
    window: ReplayWindow,
    /// Set once a later epoch took over: the key is refused from then on.
    retire_at: Option<Timestamp>,
}

struct Receiver {
    secret: Secret,
    /// Whether a packet authenticated under it yet: only then does it replace older sessions.
    used: bool,
    /// The current epoch, the ones before it while they overlap, and [`LOOKAHEAD`] next ones,
    /// derived ahead.
    epochs: Vec<ReceiveEpoch>,
    retire_at: Option<Timestamp>,
}

impl Receiver {
    fn new(secret: Secret) -> Self {
        let epochs = (0..=LOOKAHEAD)
            .map(|e| ReceiveEpoch { key: derive(&secret, e), window: ReplayWindow::new(), retire_at: None })
            .collect();
        Receiver { secret, epochs, retire_at: None, used: false }
    }
}

#[derive(Default)]
struct Peer {
    addr: Option<IpAddr>,
    /// The secret in use and, for [`SWITCH_DELAY`] after a new session, the one that replaces it.
    send: Option<Sender>,
    next_send: Option<(Sender, Timestamp)>,
    /// Newest session last; at most [`MAX_SESSIONS`].
    receive: Vec<Receiver>,
    retired: Vec<u32>,
}

/// Every peer's carrier keys. Sans-IO: the driver brings secrets, addresses, time and packets.
pub struct CarrierKeys {
    config: SealConfig,
    peers: HashMap<String, Peer>,
    by_addr: HashMap<IpAddr, String>,
    stats: SealStats,
}

impl std::fmt::Debug for CarrierKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarrierKeys").field("peers", &self.peers.len()).field("stats", &self.stats).finish()
    }
}

impl CarrierKeys {
    pub fn new(config: SealConfig) -> Self {
        CarrierKeys { config, peers: HashMap::new(), by_addr: HashMap::new(), stats: SealStats::default() }
    }

    pub fn stats(&self) -> SealStats {
        self.stats
    }

    /// Peers with a key to send with.
    pub fn peers_with_keys(&self) -> usize {
        self.peers.values().filter(|p| p.send.is_some() && p.addr.is_some()).count()
    }

    /// A new session's secret for one direction with the peer named `name` (its certificate's
    /// name).
    pub fn install(&mut self, now: Timestamp, name: &str, direction: Direction, secret: Secret) {
        // Bounded: one entry per certificate name that opened a session (the driver hands the
        // keys of every authenticated connection, member or not), a few hundred bytes each.
        if self.peers.len() >= 65_536 && !self.peers.contains_key(name) {
            return;
        }
        self.stats.sessions += 1;
        let peer = self.peers.entry_ref(name).or_default();
        match direction {
            Direction::Send => match &peer.send {
                // The first session is used at once; a later one once the peer has it too.
                None => peer.send = Some(Sender::new(secret, now)),
                Some(_) => peer.next_send = Some((Sender::new(secret, now), now.saturating_add(SWITCH_DELAY))),
            },
            Direction::Receive => {
                // Older sessions stay until a packet authenticates under a newer one (see
                // `open`): the sender may still be on one of them. Beyond the bound, a session
                // never used goes first, else the oldest.
                if peer.receive.len() >= MAX_SESSIONS {
                    let victim = peer.receive.iter().position(|r| !r.used).unwrap_or(0);
                    let gone = peer.receive.remove(victim);
                    peer.retired.extend(gone.epochs.iter().map(|e| e.key.id));
                }
                peer.receive.push(Receiver::new(secret));
                let excess = peer.retired.len().saturating_sub(RETIRED_REMEMBERED);
                peer.retired.drain(..excess);
            }
        }
    }

    /// Binds the member `name`'s underlay address to its keys (a member appeared or moved).
    pub fn bind(&mut self, name: &str, addr: IpAddr) {
        if let Some(old) = self.peers.get(name).and_then(|p| p.addr) {
            if old == addr {
                return;
            }
            self.by_addr.remove(&old);
        }
        // An address held by another name before (a dead member's) now speaks for this one.
        if let Some(previous) = self.by_addr.insert(addr, name.to_owned()) {
            if let Some(p) = self.peers.get_mut(&previous) {
                p.addr = None;
            }
        }
        self.peers.entry_ref(name).or_default().addr = Some(addr);
    }

    /// Forgets a member's keys (it is dead or gone).
    pub fn remove(&mut self, name: &str) {
        if let Some(p) = self.peers.remove(name) {
            if let Some(addr) = p.addr {
                self.by_addr.remove(&addr);
            }
        }
    }

    pub fn can_send_to(&self, addr: IpAddr) -> bool {
        self.by_addr.get(&addr).and_then(|n| self.peers.get(n)).is_some_and(|p| p.send.is_some())
    }

    /// Seals `pkts` (inner packets of `segment` bytes back to back, the last may be shorter) for
    /// `addr` into `out`, each to `segment + OVERHEAD` bytes; returns the bytes written.
    pub fn seal(
        &mut self,
        now: Timestamp,
        addr: IpAddr,
        pkts: &[u8],
        segment: usize,
        out: &mut [u8],
    ) -> Result<usize, SealError> {
        let config = self.config;
        let peer = self.by_addr.get(&addr).and_then(|n| self.peers.get_mut(n)).ok_or(SealError::NoKey)?;
        if peer.next_send.as_ref().is_some_and(|(_, at)| now >= *at) {
            peer.send = peer.next_send.take().map(|(s, _)| s);
        }
        let sender = peer.send.as_mut().ok_or(SealError::NoKey)?;
        let segment = segment.max(1);
        let count = pkts.len().div_ceil(segment);
        let total = pkts.len() + count * OVERHEAD;
        if total > out.len() {
            return Err(SealError::TooBig);
        }
        let mut at = 0;
        for pkt in pkts.chunks(segment) {
            let due = now.saturating_since(sender.since) >= config.key_lifetime;
            if due || sender.counter >= config.key_packets {
                let epoch = sender.key.epoch.wrapping_add(1);
                sender.key = derive(&sender.secret, epoch);
                sender.counter = 0;
                sender.since = now;
                self.stats.rotations += 1;
            }
            let counter = sender.counter;
            sender.counter += 1;
            let dst = &mut out[at..at + pkt.len() + OVERHEAD];
            dst[0] = TYPE_SEALED_V1;
            dst[1..4].fill(0);
            dst[4..8].copy_from_slice(&sender.key.id.to_be_bytes());
            dst[8..16].copy_from_slice(&counter.to_be_bytes());
            let (header, body) = dst.split_at_mut(HEADER);
            let (text, tag_out) = body.split_at_mut(pkt.len());
            text.copy_from_slice(pkt);
            let tag = sender
                .key
                .key
                .seal_in_place_separate_tag(nonce(counter), Aad::from(&header[..]), text)
                .map_err(|_| SealError::TooBig)?;
            tag_out.copy_from_slice(tag.as_ref());
            at += dst.len();
        }
        self.stats.sealed += u64::try_from(count).unwrap_or(u64::MAX);
        Ok(total)
    }

    /// Opens one sealed datagram from `from` in place; on success the inner packet is
    /// `datagram[HEADER..HEADER + len]` and `len` is returned.
    pub fn open(&mut self, now: Timestamp, from: IpAddr, datagram: &mut [u8]) -> Result<usize, OpenError> {
        if datagram.len() < OVERHEAD || datagram[0] != TYPE_SEALED_V1 {
            return Err(OpenError::Malformed);
        }
        let overlap = self.config.overlap;
        let peer = self.by_addr.get(&from).and_then(|n| self.peers.get_mut(n)).ok_or(OpenError::NoKey)?;
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&datagram[..HEADER]);
        let id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let counter = u64::from_be_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
        ]);
        // Sessions and epochs past their overlap are gone for good.
        peer.receive.retain(|r| {
            let keep = r.retire_at.is_none_or(|t| now < t);
            if !keep {
                peer.retired.extend(r.epochs.iter().map(|e| e.key.id));
            }
            keep
        });
        for r in &mut peer.receive {
            r.epochs.retain(|e| {
                let keep = e.retire_at.is_none_or(|t| now < t);
                if !keep {
                    peer.retired.push(e.key.id);
                }
                keep
            });
        }
        let excess = peer.retired.len().saturating_sub(RETIRED_REMEMBERED);
        peer.retired.drain(..excess);
        let found = peer
            .receive
            .iter()
            .enumerate()
            .find_map(|(s, r)| r.epochs.iter().position(|e| e.key.id == id).map(|e| (s, e)));
        let Some((s, e)) = found else {
            return Err(if peer.retired.contains(&id) { OpenError::StaleKey } else { OpenError::NoKey });
        };
        let session = &mut peer.receive[s];
        let epoch = &mut session.epochs[e];
        if !epoch.window.accepts(counter) {
            return Err(OpenError::Replayed);
        }
        let len = datagram.len() - OVERHEAD;
        let opened = epoch.key.key.open_in_place(nonce(counter), Aad::from(&header[..]), &mut datagram[HEADER..]);
        if opened.is_err() {
            return Err(OpenError::Forged);
        }
        epoch.window.mark(counter);
        // The first packet under a session: the sender switched to it, and the sessions
        // before it retire after the overlap.
        if !session.used {
            session.used = true;
            let retire = now.saturating_add(overlap);
            for older in &mut peer.receive[..s] {
                older.retire_at.get_or_insert(retire);
            }
        }
        let session = &mut peer.receive[s];
        // The first packet under a later epoch: the sender moved on. Retire what came before
        // after the overlap, and derive ahead again.
        let this = session.epochs[e].key.epoch;
        let current = session.epochs.iter().filter(|o| o.retire_at.is_none()).map(|o| o.key.epoch).min();
        if current.is_some_and(|c| this > c) {
            let retire = now.saturating_add(overlap);
            for old in session.epochs.iter_mut().filter(|o| o.key.epoch < this) {
                old.retire_at.get_or_insert(retire);
            }
            let newest = session.epochs.iter().map(|o| o.key.epoch).max().unwrap_or(this);
            for epoch in newest + 1..=this + LOOKAHEAD {
                let key = derive(&session.secret, epoch);
                session.epochs.push(ReceiveEpoch { key, window: ReplayWindow::new(), retire_at: None });
            }
        }
        self.stats.opened += 1;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_duration(Duration::from_millis(ms))
    }

    /// a's keys towards b and b's from a, one session.
    fn pair(config: SealConfig, secret: u8) -> (CarrierKeys, CarrierKeys) {
        let (mut a, mut b) = (CarrierKeys::new(config), CarrierKeys::new(config));
        a.install(t(0), "b", Direction::Send, Secret([secret; 32]));
        a.bind("b", B);
        b.install(t(0), "a", Direction::Receive, Secret([secret; 32]));
        b.bind("a", A);
        (a, b)
    }

    fn seal_one(a: &mut CarrierKeys, now: Timestamp, pkt: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; pkt.len() + OVERHEAD];
        let n = a.seal(now, B, pkt, pkt.len(), &mut out).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn a_sealed_packet_opens_once_and_hides_its_contents() {
        let (mut a, mut b) = pair(SealConfig::default(), 7);
        let pkt = b"\x45 the marker RINGLB-MARKER travels sealed";
        let mut sealed = seal_one(&mut a, t(1), pkt);
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(13).any(|w| w == b"RINGLB-MARKER"));
        let copy = sealed.clone();
        let n = b.open(t(2), A, &mut sealed).unwrap();
        assert_eq!(&sealed[HEADER..HEADER + n], pkt);
        let mut replay = copy;
        assert_eq!(b.open(t(3), A, &mut replay), Err(OpenError::Replayed));
    }

    #[test]
    fn batches_seal_each_segment_and_every_segment_opens() {
        let (mut a, mut b) = pair(SealConfig::default(), 1);
        let pkts: Vec<u8> = (0..250u8).collect(); // segments of 100, 100, 50
        let mut out = vec![0u8; 1000];
        let n = a.seal(t(1), B, &pkts, 100, &mut out).unwrap();
        assert_eq!(n, 250 + 3 * OVERHEAD);
        let stride = 100 + OVERHEAD;
        for (i, dgram) in out[..n].chunks_mut(stride).enumerate() {
            let len = b.open(t(2), A, dgram).unwrap();
            assert_eq!(&dgram[HEADER..HEADER + len], &pkts[i * 100..(i * 100 + 100).min(250)]);
        }
    }

    #[test]
    fn forged_wrong_sender_and_unknown_keys_are_refused_by_reason() {
        let (mut a, mut b) = pair(SealConfig::default(), 2);
        let good = seal_one(&mut a, t(1), b"\x45hello");
        let mut flipped = good.clone();
        flipped[HEADER + 1] ^= 1;
        assert_eq!(b.open(t(2), A, &mut flipped), Err(OpenError::Forged));
        let mut header_changed = good.clone();
        header_changed[2] = 9; // the header is authenticated too
        assert_eq!(b.open(t(2), A, &mut header_changed), Err(OpenError::Forged));
        // The same packet from an address with no keys, and from a key nobody issued.
        assert_eq!(b.open(t(2), B, &mut good.clone()), Err(OpenError::NoKey));
        let mut unknown = good.clone();
        unknown[4] ^= 0xff;
        assert_eq!(b.open(t(2), A, &mut unknown), Err(OpenError::NoKey));
        // A key of another session (an attacker's own secret) does not authenticate.
        let (mut other, _) = pair(SealConfig::default(), 3);
        assert_eq!(b.open(t(2), A, &mut seal_one(&mut other, t(1), b"\x45evil")), Err(OpenError::NoKey));
        assert_eq!(b.open(t(2), A, &mut good.clone()), Ok(6));
        assert_eq!(b.open(t(2), A, &mut [0x01, 0, 0]), Err(OpenError::Malformed));
    }

    #[test]
    fn keys_rotate_by_time_and_count_and_the_old_key_is_retired_after_the_overlap() {
        let config =
            SealConfig { key_lifetime: Duration::from_secs(10), key_packets: 1000, overlap: Duration::from_secs(2) };
        let (mut a, mut b) = pair(config, 4);
        let old = seal_one(&mut a, t(0), b"\x45epoch0");
        let late = seal_one(&mut a, t(1), b"\x45epoch0 late");
        // After the lifetime the next packet is under epoch 1, and opens.
        let new = seal_one(&mut a, t(10_000), b"\x45epoch1");
        assert_eq!(a.stats().rotations, 1);
        assert_ne!(old[4..8], new[4..8]);
        assert!(b.open(t(10_001), A, &mut old.clone()).is_ok());
        assert!(b.open(t(10_002), A, &mut new.clone()).is_ok());
        // Within the overlap a late epoch-0 packet still opens; after it, it is stale.
        assert!(b.open(t(11_000), A, &mut late.clone()).is_ok());
        let mut stale = seal_one(&mut pair(config, 4).0, t(0), b"\x45epoch0 again");
        assert_eq!(b.open(t(12_500), A, &mut stale), Err(OpenError::StaleKey));
        // By count: 1000 packets, then epoch 2.
        for _ in 0..1000 {
            seal_one(&mut a, t(10_003), b"\x45x");
        }
        assert_eq!(a.stats().rotations, 2);
    }

    #[test]
    fn a_receiver_follows_a_sender_whose_packets_of_whole_epochs_were_lost() {
        let config = SealConfig { key_lifetime: Duration::from_secs(1), ..SealConfig::default() };
        let (mut a, mut b) = pair(config, 9);
        assert!(b.open(t(0), A, &mut seal_one(&mut a, t(0), b"\x45e0")).is_ok());
        // Epochs 1 and 2 go nowhere (a cut link); epoch 3 arrives.
        seal_one(&mut a, t(1000), b"\x45e1 lost");
        seal_one(&mut a, t(2000), b"\x45e2 lost");
        let e3 = seal_one(&mut a, t(3000), b"\x45e3");
        assert_eq!(a.stats().rotations, 3);
        assert!(b.open(t(3001), A, &mut e3.clone()).is_ok());
        // And it keeps up from there, three epochs ahead again.
        for (i, at) in [4000, 5000, 6000, 7000].into_iter().enumerate() {
            let pkt = seal_one(&mut a, t(at), b"\x45later");
            assert!(b.open(t(at + 1), A, &mut pkt.clone()).is_ok(), "epoch {}", 4 + i);
        }
    }

    #[test]
    fn a_new_session_is_used_after_the_switch_delay_and_the_old_one_retires() {
        let config = SealConfig::default();
        let (mut a, mut b) = pair(config, 5);
        a.install(t(100), "b", Direction::Send, Secret([6; 32]));
        b.install(t(150), "a", Direction::Receive, Secret([6; 32]));
        let before = seal_one(&mut a, t(200), b"\x45old session");
        let after = seal_one(&mut a, t(1200), b"\x45new session");
        assert_ne!(before[4..8], after[4..8]);
        assert!(b.open(t(1300), A, &mut before.clone()).is_ok());
        assert!(b.open(t(1300), A, &mut after.clone()).is_ok());
        // The old session retires 10 s after the new one's first packet (at 1.3 s), not after
        // its install: before, a late old packet still opens (here: a replayed counter).
        let mut old_again = seal_one(&mut pair(config, 5).0, t(0), b"\x45old");
        assert_eq!(b.open(t(11_200), A, &mut old_again.clone()), Err(OpenError::Replayed));
        assert_eq!(b.open(t(11_400), A, &mut old_again), Err(OpenError::StaleKey));
    }

    #[test]
    fn a_session_installed_but_never_used_does_not_retire_the_one_in_use() {
        let config = SealConfig::default();
        let (mut a, mut b) = pair(config, 10);
        // b hears of two newer sessions (a reconnection whose handshakes finished in another
        // order than a's), but a keeps sealing with the first one.
        b.install(t(100), "a", Direction::Receive, Secret([11; 32]));
        b.install(t(200), "a", Direction::Receive, Secret([12; 32]));
        for at in [1_000, 20_000, 60_000] {
            assert!(b.open(t(at), A, &mut seal_one(&mut a, t(at), b"\x45still")).is_ok(), "at {at} ms");
        }
        // A fourth session evicts one never used, not the one in use.
        b.install(t(61_000), "a", Direction::Receive, Secret([13; 32]));
        assert!(b.open(t(61_001), A, &mut seal_one(&mut a, t(61_001), b"\x45still")).is_ok());
    }

    #[test]
    fn the_replay_window_takes_reordering_and_refuses_repeats_and_the_too_old() {
        let mut w = ReplayWindow::new();
        for c in [0, 5, 3, 4, 1, 2, 9000, 8999, 20_000] {
            assert!(w.accepts(c), "{c}");
            w.mark(c);
            assert!(!w.accepts(c), "{c} twice");
        }
        assert!(!w.accepts(20_000 - REPLAY_WINDOW), "beyond the window");
        assert!(w.accepts(20_000 - REPLAY_WINDOW + 1));
        const { assert!(REPLAY_WINDOW >= 8192) };
        // A jump of more than the whole bitmap clears it.
        w.mark(1_000_000);
        assert!(w.accepts(1_000_000 - 64 * 10));
    }

    #[test]
    fn a_bound_address_moves_with_its_member_and_removal_forgets_keys() {
        let (mut a, mut b) = pair(SealConfig::default(), 8);
        let pkt = seal_one(&mut a, t(1), b"\x45x");
        b.bind("a", B); // a now lives at B
        assert_eq!(b.open(t(2), A, &mut pkt.clone()), Err(OpenError::NoKey));
        assert!(b.open(t(2), B, &mut pkt.clone()).is_ok());
        b.remove("a");
        assert_eq!(b.open(t(3), B, &mut seal_one(&mut a, t(1), b"\x45y")), Err(OpenError::NoKey));
        assert!(!b.can_send_to(B));
        assert!(a.can_send_to(B));
    }
}
