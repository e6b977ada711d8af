//! Deterministic simulation of the cluster protocol: N real `Cluster` state machines on a
//! virtual clock, over a network that loses, delays and partitions messages, which travel in
//! their real wire encoding. Prints the seed on failure; rerun one with RINGLB_SIM_SEED=<seed>.
//!
//! Beside the honest nodes, a test may play a member with a valid certificate that sends
//! forged messages (`Sim::forge`): every attack of the trust model is tried here on the real
//! state machines, deterministically; `crates/ringlb/tests/adversary.rs` tries them again over
//! real QUIC against real daemons.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ringlb_core::cluster::message::{encode, Hint, LoadVector, Message, Record, Report, ReportKind};
use ringlb_core::{Cluster, ClusterConfig, Identity, MemberState, Outcome, Peer, Rng, Timestamp, Update};

fn addr(i: usize) -> SocketAddr {
    let i = u16::try_from(i).unwrap();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, (i & 0xff) as u8)), 6636)
}

fn name(i: usize) -> String {
    format!("n{i}")
}

/// What the control channel vouches for about node `i`: its certificate names `n<i>` and its
/// address, and it speaks from its control address.
fn peer(i: usize) -> Peer {
    Peer { name: name(i), cert_addrs: vec![addr(i).ip()], source: addr(i) }
}

/// A message in flight: (arrival, tie-break, from, to, encoded bytes).
type InFlight = Reverse<(Timestamp, u64, usize, usize, Vec<u8>)>;

struct Sim {
    nodes: Vec<Option<Cluster>>,
    now: Timestamp,
    rng: Rng,
    loss: f64,
    cut: HashSet<(usize, usize)>,
    queue: BinaryHeap<InFlight>,
    n_sent: u64,
    /// (observer, subject) for every Dead verdict seen.
    deaths: Vec<(usize, usize, Timestamp)>,
    incarnation: u64,
    /// Stalled nodes: no timers run, messages to them wait (as in a socket buffer).
    frozen: HashSet<usize>,
    held: Vec<(usize, usize, Vec<u8>)>,
    /// Each node's site; messages between sites cross the WAN.
    site: Vec<u8>,
    wan: Wan,
    /// (observer, subject) → since when the observer suspects the subject.
    suspected: BTreeMap<(usize, usize), Timestamp>,
    /// The longest suspicion that ended (refuted or not) or is still open, as last seen.
    longest_suspicion: Duration,
    /// Suspicions raised, counted per observer and subject.
    suspicions: usize,
}

/// The link between sites: one-way delay ± jitter (uniform) and loss.
#[derive(Clone, Copy, Default)]
struct Wan {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    cut: bool,
}

impl Sim {
    fn new(n: usize, seed: u64, loss: f64) -> Sim {
        let mut sim = Sim {
            nodes: (0..n).map(|_| None).collect(),
            now: Timestamp::ZERO,
            rng: Rng::seed(seed),
            loss,
            cut: HashSet::new(),
            queue: BinaryHeap::new(),
            n_sent: 0,
            deaths: Vec::new(),
            incarnation: 1,
            frozen: HashSet::new(),
            held: Vec::new(),
            site: vec![0; n],
            wan: Wan::default(),
            suspected: BTreeMap::new(),
            longest_suspicion: Duration::ZERO,
            suspicions: 0,
        };
        for i in 0..n {
            sim.start(i);
        }
        sim
    }

    fn start(&mut self, i: usize) {
        self.incarnation += 1;
        let id = Identity {
            name: name(i),
            underlay: addr(i).ip(),
            control: addr(i),
            weight: 1.0,
            flow_hash: 7,
            site: format!("s{}", self.site.get(i).copied().unwrap_or(0)),
        };
        let seeds = vec![(name(0), addr(0))];
        let seed = self.rng.next_u64();
        self.nodes[i] = Some(Cluster::new(id, self.incarnation, seeds, ClusterConfig::default(), seed, self.now));
    }

    /// The simulated node called `name`; forged members are nobody.
    fn index(&self, name: &str) -> Option<usize> {
        let i: usize = name.strip_prefix('n')?.parse().ok()?;
        (i < self.nodes.len()).then_some(i)
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now.saturating_add(d);
        loop {
            let frozen = &self.frozen;
            let next_timer = (0..self.nodes.len())
                .filter(|i| !frozen.contains(i))
                .filter_map(|i| self.nodes[i].as_ref()?.poll_timeout())
                .min();
            let next_msg = self.queue.peek().map(|Reverse((t, ..))| *t);
            let next = [next_timer, next_msg].into_iter().flatten().min().unwrap_or(end);
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            while self.queue.peek().is_some_and(|Reverse((t, ..))| *t <= self.now) {
                let Some(Reverse((_, _, from, to, bytes))) = self.queue.pop() else { break };
                if self.frozen.contains(&to) {
                    self.held.push((from, to, bytes));
                    continue;
                }
                if let Some(node) = self.nodes[to].as_mut() {
                    let outcome = node.handle_datagram(self.now, &peer(from), &bytes);
                    assert!(!matches!(outcome, Outcome::Close(_)), "an honest message was refused: {outcome:?}");
                }
            }
            for i in 0..self.nodes.len() {
                if self.frozen.contains(&i) {
                    continue;
                }
                let Some(node) = self.nodes[i].as_mut() else { continue };
                if node.poll_timeout().is_some_and(|t| t <= self.now) {
                    node.handle_timeout(self.now);
                }
                self.drain(i);
            }
        }
    }

    fn drain(&mut self, i: usize) {
        let Some(node) = self.nodes[i].as_mut() else { return };
        let mut out = Vec::new();
        while let Some(t) = node.poll_transmit() {
            out.push(t);
        }
        let mut died = Vec::new();
        let mut states = Vec::new();
        while let Some(u) = node.poll_update() {
            if let Update::Member { name, state, .. } = u {
                if state == MemberState::Dead {
                    died.push(name.clone());
                }
                states.push((name, state));
            }
        }
        for (name, state) in states {
            let Some(j) = self.index(&name) else { continue };
            if state == MemberState::Suspect {
                if !self.suspected.contains_key(&(i, j)) {
                    self.suspicions += 1;
                }
                self.suspected.entry((i, j)).or_insert(self.now);
            } else if let Some(since) = self.suspected.remove(&(i, j)) {
                self.longest_suspicion = self.longest_suspicion.max(self.now.saturating_since(since));
            }
        }
        for name in died {
            // Forged members die too, when nobody answers for them; only real ones count.
            if let Some(j) = self.index(&name) {
                self.deaths.push((i, j, self.now));
            }
        }
        for t in out {
            let Some(to) = self.index(&t.to) else { continue };
            assert_eq!(t.addr, addr(to), "transmit to {} at the wrong address", t.to);
            let bytes = t.bytes;
            let across = self.site[i] != self.site[to];
            let loss = if across { self.wan.loss } else { self.loss };
            let lost = (self.rng.next_u64() as f64 / u64::MAX as f64) < loss;
            if lost || self.cut.contains(&(i.min(to), i.max(to))) || (across && self.wan.cut) {
                continue;
            }
            let mut delay = Duration::from_micros(500 + self.rng.next_u64() % 4_500);
            if across {
                let spread = 2 * u64::try_from(self.wan.jitter.as_micros()).unwrap_or(0) + 1;
                delay += self.wan.delay - self.wan.jitter + Duration::from_micros(self.rng.next_u64() % spread);
            }
            self.n_sent += 1;
            self.queue.push(Reverse((self.now.saturating_add(delay), self.n_sent, i, to, bytes)));
        }
    }

    /// Node `i` resumes after a stall: it handles what waited for it, then its timers.
    fn thaw(&mut self, i: usize) {
        self.frozen.remove(&i);
        let held: Vec<_> = std::mem::take(&mut self.held);
        for (from, to, bytes) in held {
            if to != i {
                self.held.push((from, to, bytes));
            } else if let Some(node) = self.nodes[to].as_mut() {
                node.handle_datagram(self.now, &peer(from), &bytes);
            }
        }
        self.drain(i);
    }

    /// A member with a valid certificate (`from`) sends `msg` to node `to`.
    fn forge(&mut self, to: usize, from: &Peer, msg: &Message) -> Outcome {
        let bytes = encode(msg).expect("forgeries are well-formed");
        let outcome = self.nodes[to].as_mut().unwrap().handle_datagram(self.now, from, &bytes);
        self.drain(to);
        outcome
    }

    fn node(&self, i: usize) -> &Cluster {
        self.nodes[i].as_ref().unwrap()
    }

    /// For each live node, how it sees every other live node.
    fn views(&self) -> BTreeMap<(usize, usize), Option<MemberState>> {
        let mut v = BTreeMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            for j in 0..self.nodes.len() {
                if i != j && self.nodes[j].is_some() {
                    v.insert((i, j), node.member(&name(j)).map(|u| u.state));
                }
            }
        }
        v
    }

    fn all_alive(&self) -> bool {
        self.views().values().all(|s| *s == Some(MemberState::Alive))
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("RINGLB_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("RINGLB_SIM_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    }
}

fn with_seed(test: impl Fn(u64)) {
    for seed in seeds() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(seed)));
        if let Err(e) = r {
            eprintln!("membership simulation failed with seed {seed} (RINGLB_SIM_SEED={seed} to replay)");
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn fifty_nodes_converge_under_loss_and_nobody_live_is_declared_dead() {
    with_seed(|seed| {
        let mut sim = Sim::new(50, seed, 0.05);
        sim.run_for(Duration::from_secs(30));
        // Under loss a suspicion is always in flight somewhere; once the loss stops, every
        // view must settle to all alive within a few protocol periods.
        let unknown = sim.views().into_iter().filter(|(_, s)| s.is_none()).count();
        assert_eq!(unknown, 0, "seed {seed}: some members never learned of others");
        sim.loss = 0.0;
        sim.run_for(Duration::from_secs(3));
        let bad: Vec<_> = sim.views().into_iter().filter(|(_, s)| *s != Some(MemberState::Alive)).collect();
        assert!(bad.is_empty(), "seed {seed}: not converged: {:?}", &bad[..bad.len().min(10)]);
        assert!(sim.deaths.is_empty(), "seed {seed}: live members declared dead: {:?}", sim.deaths);
    });
}

#[test]
fn a_dead_node_is_detected_by_all_and_a_restarted_one_rejoins() {
    with_seed(|seed| {
        let mut sim = Sim::new(12, seed, 0.05);
        sim.run_for(Duration::from_secs(10));
        assert!(sim.all_alive(), "seed {seed}: not converged before the kill");
        let killed_at = sim.now;
        sim.nodes[7] = None;
        sim.run_for(Duration::from_secs(8));
        for i in (0..12).filter(|&i| i != 7) {
            let s = sim.nodes[i].as_ref().unwrap().member("n7").map(|u| u.state);
            assert_eq!(s, Some(MemberState::Dead), "seed {seed}: n{i} sees the killed n7 as {s:?}");
        }
        let first = sim.deaths.iter().filter(|d| d.1 == 7).map(|d| d.2).min().unwrap();
        println!("seed {seed}: n7 first declared dead {:?} after the kill", first.saturating_since(killed_at));
        assert!(sim.deaths.iter().all(|d| d.1 == 7), "seed {seed}: others declared dead: {:?}", sim.deaths);
        sim.start(7);
        sim.run_for(Duration::from_secs(6));
        // Under loss a suspicion is always in flight somewhere; once it stops, all settle.
        sim.loss = 0.0;
        sim.run_for(Duration::from_secs(3));
        assert!(sim.all_alive(), "seed {seed}: restarted n7 did not rejoin everywhere: {:?}", sim.views());
    });
}

/// Two sites of three, joined by a WAN of 150 ms ± 30 ms round trip and 3 % loss.
fn two_sites(seed: u64) -> Sim {
    let mut sim = Sim::new(6, seed, 0.0);
    sim.site = vec![0, 0, 0, 1, 1, 1];
    for i in 0..6 {
        sim.start(i); // again, now that it has its site
    }
    sim.wan = Wan { delay: Duration::from_millis(75), jitter: Duration::from_millis(15), loss: 0.03, cut: false };
    sim
}

#[test]
fn a_lossy_wan_between_sites_declares_nobody_dead_and_suspects_only_briefly() {
    with_seed(|seed| {
        let mut sim = two_sites(seed);
        sim.run_for(Duration::from_secs(10));
        assert!(sim.all_alive(), "seed {seed}: not converged over the WAN: {:?}", sim.views());
        sim.run_for(Duration::from_secs(60));
        let open = sim.suspected.values().map(|since| sim.now.saturating_since(*since)).max().unwrap_or_default();
        let longest = sim.longest_suspicion.max(open);
        println!("seed {seed}: {} suspicions, longest {longest:?}, deaths {:?}", sim.suspicions, sim.deaths);
        assert!(sim.deaths.is_empty(), "seed {seed}: live members declared dead over the WAN: {:?}", sim.deaths);
        // Timers from each peer's measured round trip: a far member is rarely even suspected
        // (with the LAN's fixed 80 ms probe timeout, 50 to 70 suspicions in this minute).
        assert!(sim.suspicions <= 10, "seed {seed}: {} suspicions", sim.suspicions);
        // Shorter than one suspicion period (the 2 s minimum): every suspicion was refuted.
        assert!(longest < Duration::from_secs(2), "seed {seed}: a suspicion lasted {longest:?}");
    });
}

#[test]
fn a_cut_wan_splits_the_sites_and_they_reconverge_within_10_s_of_healing() {
    with_seed(|seed| {
        let mut sim = two_sites(seed);
        sim.run_for(Duration::from_secs(10));
        assert!(sim.all_alive());
        sim.wan.cut = true;
        sim.run_for(Duration::from_secs(20));
        // Each site sees itself alive and takes the other for suspect or dead (neither takes
        // new flows); nobody within a site died.
        for (&(i, j), s) in &sim.views() {
            if sim.site[i] == sim.site[j] {
                assert_eq!(*s, Some(MemberState::Alive), "seed {seed}: n{i} sees n{j} as {s:?} while the WAN is cut");
            } else {
                assert!(
                    matches!(s, Some(MemberState::Suspect | MemberState::Dead)),
                    "seed {seed}: n{i} sees n{j} as {s:?}"
                );
            }
        }
        let died = sim.deaths.iter().filter(|d| sim.site[d.0] != sim.site[d.1]).count();
        println!("seed {seed}: {died} deaths across the cut WAN, {} within a site", sim.deaths.len() - died);
        assert_eq!(died, sim.deaths.len(), "seed {seed}: a member died within its site: {:?}", sim.deaths);
        sim.wan.cut = false;
        let healed = sim.now;
        while !sim.all_alive() {
            sim.run_for(Duration::from_millis(100));
            let took = sim.now.saturating_since(healed);
            assert!(
                took < Duration::from_secs(10),
                "seed {seed}: not reconverged 10 s after healing: {:?}",
                sim.views()
            );
        }
        println!("seed {seed}: reconverged {:?} after healing", sim.now.saturating_since(healed));
    });
}

#[test]
fn a_cut_path_does_not_kill_and_a_partition_heals() {
    with_seed(|seed| {
        let mut sim = Sim::new(3, seed, 0.0);
        sim.run_for(Duration::from_secs(3));
        assert!(sim.all_alive());
        sim.cut.insert((0, 1));
        sim.run_for(Duration::from_secs(10));
        assert!(sim.all_alive(), "seed {seed}: one cut path made a member look dead: {:?}", sim.views());
        assert!(sim.deaths.is_empty());
        // Full partition of n2 from both: it is declared dead, then comes back after healing.
        sim.cut.clear();
        sim.cut.insert((0, 2));
        sim.cut.insert((1, 2));
        sim.run_for(Duration::from_secs(8));
        assert_eq!(sim.nodes[0].as_ref().unwrap().member("n2").map(|u| u.state), Some(MemberState::Dead));
        sim.cut.clear();
        sim.run_for(Duration::from_secs(8));
        assert!(sim.all_alive(), "seed {seed}: partition did not heal: {:?}", sim.views());
    });
}

#[test]
fn a_restarted_seed_and_a_paused_node_both_come_back() {
    with_seed(|seed| {
        let mut sim = Sim::new(6, seed, 0.0);
        sim.run_for(Duration::from_secs(4));
        assert!(sim.all_alive());
        // n0 is everyone's seed and has none itself.
        sim.nodes[0] = None;
        sim.run_for(Duration::from_secs(8));
        sim.start(0);
        sim.run_for(Duration::from_secs(5));
        assert!(sim.all_alive(), "seed {seed}: the restarted seed did not rejoin: {:?}", sim.views());
        // n3 freezes (no timers, messages to it lost) for longer than the suspicion timeout.
        let frozen = sim.nodes[3].take();
        sim.run_for(Duration::from_secs(6));
        sim.nodes[3] = frozen;
        sim.run_for(Duration::from_secs(5));
        assert!(sim.all_alive(), "seed {seed}: the paused node did not come back: {:?}", sim.views());
    });
}

fn record_of(sim: &Sim, i: usize) -> Record {
    let n = (0..sim.nodes.len()).find(|&j| j != i && sim.nodes[j].is_some()).unwrap();
    let v = sim.node(n).member(&name(i)).unwrap();
    Record {
        name: name(i),
        incarnation: v.incarnation,
        state: MemberState::Alive,
        underlay: v.underlay,
        control: v.control,
        weight: v.weight,
        flow_hash: 7,
        site: "default".into(),
    }
}

fn refused(sim: &Sim, i: usize, r: ringlb_core::Refusal) -> u64 {
    sim.node(i).stats().refused(r)
}

/// A member holding a valid certificate (n3's) forges every claim of the trust model against
/// the others; none takes effect, each refusal is counted, and nobody is declared dead.
#[test]
fn a_certificate_holder_cannot_evict_invent_or_outweigh() {
    use ringlb_core::Refusal;
    with_seed(|seed| {
        let mut sim = Sim::new(4, seed, 0.0);
        sim.run_for(Duration::from_secs(3));
        assert!(sim.all_alive());
        let attacker = peer(3);
        let me = record_of(&sim, 3);
        let victim = record_of(&sim, 2);
        for to in [0, 1] {
            // 1. Eviction: the victim dead or suspect at an incarnation it never had.
            for kind in [ReportKind::Dead, ReportKind::Suspect] {
                let report = Report { name: name(2), incarnation: u64::MAX, kind };
                let msg = Message::Announce { sender: me.clone(), reports: vec![report] };
                assert_eq!(sim.forge(to, &attacker, &msg), Outcome::Refused(Refusal::Incarnation));
            }
            // ... or a record of the victim's (a leave), spoken by another: the connection closes.
            let mut left = victim.clone();
            left.state = MemberState::Left;
            left.incarnation += 1;
            assert_eq!(
                sim.forge(to, &attacker, &Message::Announce { sender: left, reports: vec![] }),
                Outcome::Close(Refusal::Identity)
            );
            // 2. Ghosts: reports about a name nobody knows; hints are only hints.
            let ghost = Report { name: "zz".into(), incarnation: 1, kind: ReportKind::Suspect };
            let msg = Message::Announce { sender: me.clone(), reports: vec![ghost] };
            assert_eq!(sim.forge(to, &attacker, &msg), Outcome::Refused(Refusal::NotMember));
            let hint = Hint { name: "zz".into(), control: "10.77.0.99:6636".parse().unwrap() };
            sim.forge(to, &attacker, &Message::Introduce { sender: me.clone(), hints: vec![hint] });
            // 3. Steering: a huge weight, and an address that is not its own.
            let load = LoadVector {
                incarnation: me.incarnation,
                served_flows: 0,
                new_flows_per_sec: 0.0,
                cpu: 0.0,
                weight: 3e38,
                draining: false,
                entry_claim: false,
                entry_candidate: false,
                app_unhealthy: false,
            };
            assert_eq!(sim.forge(to, &attacker, &Message::Load(load)), Outcome::Refused(Refusal::WeightClamped));
            let implausible = LoadVector { cpu: 7.0, weight: 1.0, ..load };
            assert_eq!(
                sim.forge(to, &attacker, &Message::Load(implausible)),
                Outcome::Refused(Refusal::ImplausibleLoad)
            );
            let mut moved = me.clone();
            moved.incarnation += 10;
            moved.underlay = victim.underlay;
            assert_eq!(
                sim.forge(to, &attacker, &Message::Announce { sender: moved, reports: vec![] }),
                Outcome::Refused(Refusal::Address)
            );
        }
        // The victim's current incarnation is reported dead again and again: reports only make
        // the receivers probe it, and it answers.
        for _ in 0..50 {
            let inc = sim.node(0).member("n2").unwrap().incarnation;
            let report = Report { name: name(2), incarnation: inc, kind: ReportKind::Dead };
            for to in [0, 1] {
                sim.forge(to, &attacker, &Message::Announce { sender: me.clone(), reports: vec![report.clone()] });
            }
            sim.run_for(Duration::from_millis(100));
        }
        sim.run_for(Duration::from_secs(8));
        assert!(sim.deaths.is_empty(), "seed {seed}: deaths {:?}", sim.deaths);
        for i in [0, 1] {
            let n = sim.node(i);
            assert!(n.member("zz").is_none(), "seed {seed}: a ghost became a member");
            assert_eq!(n.member("n3").unwrap().weight, ClusterConfig::default().max_weight, "weight clamped");
            assert_eq!(n.member("n3").unwrap().underlay, addr(3).ip(), "address kept");
            assert_eq!(refused(&sim, i, Refusal::Incarnation), 2);
            assert_eq!(refused(&sim, i, Refusal::Identity), 1);
            assert_eq!(refused(&sim, i, Refusal::Address), 1);
        }
        assert!(sim.all_alive(), "seed {seed}: {:?}", sim.views());
    });
}

/// 1,100 certificate holders introduce themselves: the table stops at its cap and says so.
#[test]
fn the_member_table_has_a_cap() {
    let mut sim = Sim::new(2, 1, 0.0);
    sim.run_for(Duration::from_secs(2));
    let cap = ClusterConfig::default().max_members;
    let mut full = 0u64;
    for k in 0..1100u32 {
        let [_, _, hi, lo] = k.to_be_bytes();
        let ip = IpAddr::V4(Ipv4Addr::new(10, 9, hi, lo));
        let control = SocketAddr::new(ip, 6636);
        let p = Peer { name: format!("z{k}"), cert_addrs: vec![ip], source: control };
        let rec = Record {
            name: p.name.clone(),
            incarnation: 1,
            state: MemberState::Alive,
            underlay: ip,
            control,
            weight: 1.0,
            flow_hash: 7,
            site: "default".into(),
        };
        if sim.forge(0, &p, &Message::Join { sender: rec }) == Outcome::Refused(ringlb_core::Refusal::TableFull) {
            full += 1;
        }
    }
    assert_eq!(sim.node(0).members().count(), cap - 1, "the table holds the cap, this node included");
    assert_eq!(full, 1100 - (cap as u64 - 2));
    assert_eq!(refused(&sim, 0, ringlb_core::Refusal::TableFull), full);
}

/// A new node at a dead node's address takes it as soon as the old one is dead; the dead are
/// forgotten after `dead_expiry`.
#[test]
fn a_dead_nodes_address_goes_to_its_replacement() {
    with_seed(|seed| {
        let mut sim = Sim::new(3, seed, 0.0);
        sim.run_for(Duration::from_secs(3));
        let old = record_of(&sim, 2);
        sim.nodes[2] = None;
        let replacement = Peer { name: "n9".into(), cert_addrs: vec![addr(2).ip()], source: addr(2) };
        let rec = Record { name: "n9".into(), incarnation: 1, ..old };
        assert_eq!(
            sim.forge(0, &replacement, &Message::Join { sender: rec.clone() }),
            Outcome::Refused(ringlb_core::Refusal::AddressInUse),
            "n2 is not known dead yet"
        );
        sim.run_for(Duration::from_secs(8));
        assert_eq!(sim.node(0).member("n2").map(|v| v.state), Some(MemberState::Dead));
        assert_eq!(sim.forge(0, &replacement, &Message::Join { sender: rec }), Outcome::Accepted);
        assert!(sim.node(0).member("n2").is_none(), "the dead holder yielded its address");
        assert_eq!(sim.node(0).member("n9").map(|v| v.underlay), Some(addr(2).ip()));
        // n1 forgets n2 after the expiry.
        sim.run_for(ClusterConfig::default().dead_expiry);
        assert!(sim.node(1).member("n2").is_none(), "seed {seed}: n1 still remembers the dead n2");
    });
}

/// A node stalled for 1.5 s (no timers, messages waiting) is suspected but refutes in time, and
/// does not itself suspect the others for what it missed while it did not run.
#[test]
fn a_stalled_node_is_suspected_and_refutes_and_suspects_nobody() {
    with_seed(|seed| {
        let mut sim = Sim::new(3, seed, 0.0);
        sim.run_for(Duration::from_secs(3));
        let suspected_before: u64 = (0..3).map(|i| sim.node(i).stats().suspected).sum();
        sim.frozen.insert(2);
        sim.run_for(Duration::from_millis(1500));
        sim.thaw(2);
        sim.run_for(Duration::from_secs(6));
        let suspected: u64 = (0..2).map(|i| sim.node(i).stats().suspected).sum::<u64>() - suspected_before;
        assert!(sim.deaths.is_empty(), "seed {seed}: {:?}", sim.deaths);
        assert!(suspected >= 1, "seed {seed}: nobody suspected the stalled node");
        assert_eq!(sim.node(2).stats().suspected, 0, "seed {seed}: the stalled node blamed others");
        assert!(sim.node(2).stats().refuted >= 1);
        assert!(sim.all_alive(), "seed {seed}: {:?}", sim.views());
    });
}

/// A member reports another at its current incarnation again and again, and pushes hints on
/// it unasked: the victim refutes at most once a probe interval, its own timeouts stay as
/// they are (reports never move local health), and no pushed name is ever tried.
#[test]
fn reports_cannot_slow_a_node_and_hints_come_only_when_asked() {
    use ringlb_core::Refusal;
    with_seed(|seed| {
        let mut sim = Sim::new(3, seed, 0.0);
        sim.run_for(Duration::from_secs(3));
        let attacker = peer(2);
        let me = record_of(&sim, 2);
        let refuted_before = sim.node(0).stats().refuted;
        let mut accepted = 0u64;
        for k in 0..200u32 {
            let inc = sim.node(1).member("n0").unwrap().incarnation;
            let report = Report { name: name(0), incarnation: inc, kind: ReportKind::Suspect };
            sim.forge(0, &attacker, &Message::Announce { sender: me.clone(), reports: vec![report] });
            let hint = Hint { name: format!("ghost{k}"), control: "10.9.9.9:6636".parse().unwrap() };
            // Taken only as the answer to a Join n0 sent n2 (about one every 2 s).
            if sim.forge(0, &attacker, &Message::Introduce { sender: me.clone(), hints: vec![hint] })
                == Outcome::Accepted
            {
                accepted += 1;
            }
            sim.run_for(Duration::from_millis(50));
        }
        assert!(accepted <= 12, "seed {seed}: {accepted} unasked introductions taken in 10 s");
        assert!(sim.node(0).stats().refused(Refusal::RateLimited) >= 200 - accepted);
        let refuted = sim.node(0).stats().refuted - refuted_before;
        assert!(refuted <= 10 * 5 + 1, "seed {seed}: {refuted} refutations in 10 s");
        assert_eq!(sim.node(0).local_health(), 0, "seed {seed}: reports moved local health");
        let tried = (0..200).filter(|k| sim.node(0).knows(&format!("ghost{k}"))).count() as u64;
        assert!(tried <= accepted, "seed {seed}: {tried} pushed hints tried");
        assert!(sim.deaths.is_empty() && sim.all_alive(), "seed {seed}: {:?}", sim.views());
    });
}

/// Two nodes, one per site, across a WAN of 80 ms ± 10 ms round trip and 3 % loss: nobody can
/// probe indirectly, so an unanswered direct probe is sent once more before the round ends. A
/// lost ping or ack alone then makes no suspicion (once, each made the peer suspect and its
/// forward-only entry serve new flows itself).
#[test]
fn two_nodes_over_a_lossy_wan_retry_a_lost_probe_instead_of_suspecting() {
    with_seed(|seed| {
        let mut sim = Sim::new(2, seed, 0.0);
        sim.site = vec![0, 1];
        for i in 0..2 {
            sim.start(i);
        }
        sim.wan = Wan { delay: Duration::from_millis(40), jitter: Duration::from_millis(5), loss: 0.03, cut: false };
        sim.run_for(Duration::from_secs(10));
        assert!(sim.all_alive(), "seed {seed}: not converged over the WAN: {:?}", sim.views());
        let before = sim.suspicions;
        sim.run_for(Duration::from_secs(120));
        let suspicions = sim.suspicions - before;
        println!("seed {seed}: {suspicions} suspicions in 120 s, deaths {:?}", sim.deaths);
        assert!(sim.deaths.is_empty(), "seed {seed}: {:?}", sim.deaths);
        // About 4 rounds a second each way for 120 s: 1,000 probes per node. One lost of ping
        // or ack is 6 %, two in a row 0.35 %.
        assert!(suspicions <= 12, "seed {seed}: {suspicions} suspicions in 120 s");
    });
}
