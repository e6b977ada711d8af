//! Deterministic simulation of SWIM membership: N real `Membership` state machines on a
//! virtual clock, over a network that loses, delays and partitions messages, which travel in
//! their real wire encoding. Prints the seed on failure; rerun one with RINGLB_SIM_SEED=<seed>.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ringlb_core::membership::{Identity, Membership, MembershipConfig, MembershipEvent};
use ringlb_core::{Rng, Timestamp};
use ringlb_wire::control::{decode, encode, UpdateState};

fn addr(i: usize) -> SocketAddr {
    let i = u16::try_from(i).unwrap();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, (i & 0xff) as u8)), 6636)
}

fn name(i: usize) -> String {
    format!("n{i}")
}

/// A message in flight: (arrival, tie-break, from, to, encoded bytes).
type InFlight = Reverse<(Timestamp, u64, usize, usize, Vec<u8>)>;

struct Sim {
    nodes: Vec<Option<Membership>>,
    now: Timestamp,
    rng: Rng,
    loss: f64,
    cut: HashSet<(usize, usize)>,
    queue: BinaryHeap<InFlight>,
    n_sent: u64,
    /// (observer, subject) for every Dead verdict seen.
    deaths: Vec<(usize, usize, Timestamp)>,
    incarnation: u64,
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
        };
        for i in 0..n {
            sim.start(i);
        }
        sim
    }

    fn start(&mut self, i: usize) {
        self.incarnation += 1;
        let id = Identity { name: name(i), underlay: addr(i).ip(), control: addr(i), weight: 1.0 };
        let seeds = vec![(name(0), addr(0))];
        let seed = self.rng.next_u64();
        self.nodes[i] = Some(Membership::new(id, self.incarnation, seeds, MembershipConfig::default(), seed, self.now));
    }

    fn index(name: &str) -> usize {
        name[1..].parse().unwrap()
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now.saturating_add(d);
        loop {
            let next_timer = self.nodes.iter().flatten().filter_map(Membership::poll_timeout).min();
            let next_msg = self.queue.peek().map(|Reverse((t, ..))| *t);
            let next = [next_timer, next_msg].into_iter().flatten().min().unwrap_or(end);
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            while self.queue.peek().is_some_and(|Reverse((t, ..))| *t <= self.now) {
                let Some(Reverse((_, _, from, to, bytes))) = self.queue.pop() else { break };
                let msg = decode(&bytes).expect("what one node encodes another decodes");
                if let Some(node) = self.nodes[to].as_mut() {
                    node.handle(self.now, &name(from), msg);
                }
            }
            for i in 0..self.nodes.len() {
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
        while let Some(MembershipEvent::Member(u)) = node.poll_event() {
            if u.state == UpdateState::Dead {
                self.deaths.push((i, Self::index(&u.name), self.now));
            }
        }
        for t in out {
            let to = Self::index(&t.to_name);
            assert_eq!(t.to_addr, addr(to), "transmit to {} at the wrong address", t.to_name);
            let bytes = encode(&t.msg).expect("every message fits a datagram");
            let lost = (self.rng.next_u64() as f64 / u64::MAX as f64) < self.loss;
            if lost || self.cut.contains(&(i.min(to), i.max(to))) {
                continue;
            }
            let delay = Duration::from_micros(500 + self.rng.next_u64() % 4_500);
            self.n_sent += 1;
            self.queue.push(Reverse((self.now.saturating_add(delay), self.n_sent, i, to, bytes)));
        }
    }

    /// For each live node, how it sees every other live node.
    fn views(&self) -> BTreeMap<(usize, usize), Option<UpdateState>> {
        let mut v = BTreeMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            for j in 0..self.nodes.len() {
                if i != j && self.nodes[j].is_some() {
                    v.insert((i, j), node.peer(&name(j)).map(|u| u.state));
                }
            }
        }
        v
    }

    fn all_alive(&self) -> bool {
        self.views().values().all(|s| *s == Some(UpdateState::Alive))
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
        let bad: Vec<_> = sim.views().into_iter().filter(|(_, s)| *s != Some(UpdateState::Alive)).collect();
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
            let s = sim.nodes[i].as_ref().unwrap().peer("n7").map(|u| u.state);
            assert_eq!(s, Some(UpdateState::Dead), "seed {seed}: n{i} sees the killed n7 as {s:?}");
        }
        let first = sim.deaths.iter().filter(|d| d.1 == 7).map(|d| d.2).min().unwrap();
        println!("seed {seed}: n7 first declared dead {:?} after the kill", first.saturating_since(killed_at));
        assert!(sim.deaths.iter().all(|d| d.1 == 7), "seed {seed}: others declared dead: {:?}", sim.deaths);
        sim.start(7);
        sim.run_for(Duration::from_secs(6));
        assert!(sim.all_alive(), "seed {seed}: restarted n7 did not rejoin everywhere: {:?}", sim.views());
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
        assert_eq!(sim.nodes[0].as_ref().unwrap().peer("n2").map(|u| u.state), Some(UpdateState::Dead));
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
