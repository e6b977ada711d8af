//! The control plane over real QUIC with mutual TLS, on loopback: cluster formation, refusal
//! of foreign certificates, identity claims and malformed messages.
//!
//! As root (as in CI), each test re-runs itself inside a network namespace of its own, which
//! has nothing but a loopback interface: whatever the code under test does, no packet can
//! leave it. Without root the tests run on the host's loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use ringlb_control::certs;
use ringlb_control::driver::spawn;
use ringlb_control::tls::{self, TlsFiles};
use ringlb_control::{ControlConfig, ControlEvent, ControlHandle};
use ringlb_core::cluster::message::{encode, Message, Record};
use ringlb_core::{ClusterConfig, Identity, LocalLoad, MemberState, Refusal};
use tokio::sync::{mpsc, watch};

static PORT: AtomicU16 = AtomicU16::new(0);

/// A loopback port of its own: a range per process, a port per call.
fn port() -> u16 {
    let base = 20_000 + u16::try_from(std::process::id() % 2_000).unwrap() * 16;
    base + PORT.fetch_add(1, Ordering::Relaxed) % 16
}

fn pki(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringlb-pki-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    certs::init_ca(&dir).unwrap();
    dir
}

fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
}

struct Node {
    handle: ControlHandle,
    events: mpsc::Receiver<ControlEvent>,
    _stop: watch::Sender<bool>,
    _load: watch::Sender<LocalLoad>,
}

fn start(dir: &Path, name: &str, addr: SocketAddr, seeds: Vec<(String, SocketAddr)>) -> Node {
    certs::issue(dir, name, addr.ip(), Duration::from_secs(86_400)).unwrap();
    let config = ControlConfig {
        identity: Identity {
            name: name.into(),
            underlay: addr.ip(),
            control: addr,
            weight: 1.0,
            flow_hash: 7,
            site: "default".into(),
        },
        listen: addr,
        seeds,
        tls: files(dir, name),
        cluster: ClusterConfig::default(),
        limits: ringlb_control::Limits::default(),
        load_interval: Duration::from_millis(100),
        incarnation: 1,
    };
    let (tx, events) = mpsc::channel(1024);
    let (load_tx, load_rx) = watch::channel(LocalLoad::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, _task) = spawn(config, tx, load_rx, stop_rx).unwrap();
    Node { handle, events, _stop: stop_tx, _load: load_tx }
}

fn alive(n: &Node) -> usize {
    n.handle.members().iter().filter(|m| m.state == MemberState::Alive).count()
}

async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Runs `body` inside a fresh network namespace when this process is root (re-running this
/// test binary for the one test `name` there), else right here.
fn isolated<F: std::future::Future<Output = ()>>(name: &str, body: impl FnOnce() -> F) {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n");
    if std::env::var_os("RINGLB_TEST_IN_NETNS").is_some() || !root {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        return rt.block_on(body());
    }
    let ns = format!("rlt-ctl-{}-{}", std::process::id(), port());
    let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status().is_ok_and(|s| s.success());
    assert!(ip(&["netns", "add", &ns]), "creating network namespace {ns}");
    // Deleted however the test ends.
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _guard = Netns(ns.clone());
    assert!(ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]));
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env("RINGLB_TEST_IN_NETNS", "1")
        .status()
        .unwrap();
    assert!(status.success(), "{name} failed inside network namespace {ns}");
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Node `k`'s own loopback address (127.0.0.k): underlay addresses are unique in a cluster.
fn node_addr(k: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, k)), port)
}

#[test]
fn three_nodes_form_a_cluster_from_one_seed_and_share_load() {
    isolated("three_nodes_form_a_cluster_from_one_seed_and_share_load", || async {
        let dir = pki("form");
        let a = node_addr(1, port());
        let n1 = start(&dir, "n1", a, vec![]);
        let mut n2 = start(&dir, "n2", node_addr(2, port()), vec![("n1".into(), a)]);
        let n3 = start(&dir, "n3", node_addr(3, port()), vec![("n1".into(), a)]);
        eventually("all see 3 alive", || [&n1, &n2, &n3].iter().all(|n| alive(n) == 3)).await;
        eventually("load vectors flow", || {
            n3.handle
                .members()
                .iter()
                .filter(|m| m.name != "n3")
                .all(|m| m.load_age.is_some_and(|a| a < Duration::from_secs(1)))
        })
        .await;
        // The data plane hears of members and loads.
        let mut saw_member = false;
        let mut saw_load = false;
        while let Ok(ev) = n2.events.try_recv() {
            match ev {
                ControlEvent::Cluster(ringlb_core::Update::Member { name, state, .. }) => {
                    saw_member |= name == "n3" && state == MemberState::Alive
                }
                ControlEvent::Cluster(ringlb_core::Update::Load { .. }) => saw_load = true,
                _ => {}
            }
        }
        assert!(saw_member && saw_load);
        let refused: u64 = Refusal::ALL.iter().map(|r| n1.handle.stats().refused(*r)).sum();
        assert_eq!(refused, 0, "an honest cluster refused something: {:?}", n1.handle.stats());
    });
}

/// A QUIC client with arbitrary credentials, to play a rogue or a broken member.
async fn raw_client(
    files: &TlsFiles,
    server_ca: &Path,
    to: SocketAddr,
    server_name: &str,
) -> Option<quinn::Connection> {
    // Trust the cluster's CA for the server, present our own (possibly foreign) certificate.
    let f = TlsFiles { ca: server_ca.to_owned(), cert: files.cert.clone(), key: files.key.clone() };
    let client = tls::client_config(&f).unwrap();
    let mut ep = quinn::Endpoint::client(loopback(0)).unwrap();
    ep.set_default_client_config(client);
    let conn = ep.connect(to, server_name).unwrap().await.ok()?;
    // The server checks the client certificate after the handshake completes on our side;
    // a refused client sees the connection closed right away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.close_reason().is_none().then_some(conn)
}

#[test]
fn foreign_certificates_are_refused_and_counted() {
    isolated("foreign_certificates_are_refused_and_counted", || async {
        let dir = pki("rogue-cluster");
        let a = loopback(port());
        let n1 = start(&dir, "n1", a, vec![]);
        let other = pki("rogue-other");
        certs::issue(&other, "n9", a.ip(), Duration::from_secs(86_400)).unwrap();
        // From another CA.
        assert!(raw_client(&files(&other, "n9"), &dir.join("ca.pem"), a, "n1").await.is_none());
        // Self-signed: the other CA's own certificate and key.
        let self_signed = TlsFiles { ca: other.join("ca.pem"), cert: other.join("ca.pem"), key: other.join("ca.key") };
        assert!(raw_client(&self_signed, &dir.join("ca.pem"), a, "n1").await.is_none());
        eventually("refusals counted", || n1.handle.stats().refused(Refusal::Tls) >= 2).await;
        assert_eq!(alive(&n1), 1, "a rogue became a member");
    });
}

#[test]
fn false_identity_and_malformed_messages_close_the_connection_and_are_counted() {
    isolated("false_identity_and_malformed_messages_close_the_connection_and_are_counted", || async {
        let dir = pki("liar");
        let a = node_addr(1, port());
        let n1 = start(&dir, "n1", a, vec![]);
        let n2 = start(&dir, "n2", node_addr(2, port()), vec![("n1".into(), a)]);
        eventually("two alive", || alive(&n1) == 2).await;
        let n2_record = |incarnation: u64, underlay: IpAddr| Record {
            name: "n2".into(),
            incarnation,
            state: MemberState::Alive,
            underlay,
            control: loopback(9),
            weight: 1.0,
            flow_hash: 7,
            site: "default".into(),
        };

        // n3 holds a valid certificate (for 127.0.0.1) but claims to be n2.
        certs::issue(&dir, "n3", Ipv4Addr::LOCALHOST.into(), Duration::from_secs(86_400)).unwrap();
        let liar =
            raw_client(&files(&dir, "n3"), &dir.join("ca.pem"), a, "n1").await.expect("valid certificate connects");
        let claim = n2_record(u64::MAX, IpAddr::V4(Ipv4Addr::LOCALHOST));
        liar.send_datagram(encode(&Message::Join { sender: claim }).unwrap().into()).unwrap();
        eventually("identity refusal", || n1.handle.stats().refused(Refusal::Identity) == 1).await;
        eventually("liar disconnected", || liar.close_reason().is_some()).await;

        // The same certificate holder says that n2 moved elsewhere: only n2 speaks for n2.
        let gossiper = raw_client(&files(&dir, "n3"), &dir.join("ca.pem"), a, "n1").await.expect("connects");
        let moved = n2_record(u64::MAX, IpAddr::V4(Ipv4Addr::new(127, 6, 6, 6)));
        gossiper.send_datagram(encode(&Message::Announce { sender: moved, reports: vec![] }).unwrap().into()).unwrap();
        eventually("second identity refusal", || n1.handle.stats().refused(Refusal::Identity) == 2).await;
        let n2_addr = n1.handle.members().into_iter().find(|m| m.name == "n2").map(|m| m.underlay);
        assert_eq!(n2_addr, Some(node_addr(2, 0).ip()), "a third party moved n2's address");

        // A member sending garbage (a field longer than the message), then an oversized one.
        for payload in [vec![2u8, 1, 1, 0, 200], vec![2u8; 1190]] {
            let conn = raw_client(&files(&dir, "n3"), &dir.join("ca.pem"), a, "n1").await.expect("connects");
            conn.send_datagram(payload.into()).unwrap();
            eventually("connection closed", || conn.close_reason().is_some()).await;
        }
        eventually("malformed counted", || n1.handle.stats().refused(Refusal::Malformed) == 2).await;
        // n1 keeps running and keeps its view of n2.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(alive(&n1), 2);
        assert!(n1.handle.members().iter().any(|m| m.name == "n2" && m.state == MemberState::Alive));
        drop(n2);
    });
}
