//! VIP steering: the node-wide kernel state that sends VIP traffic into ringlb.
//!
//! `setup` makes these changes, recording each one's previous value in a state file first:
//! - the VIP as a /32 on `lo`, so that this node's apps can bind it and it survives the daemon;
//! - `arp_ignore=1`, `arp_announce=2`, so that nodes neither answer nor announce ARP for it;
//! - `ip_early_demux=0`: with it on, a local (or TIME_WAIT) socket is attached to packets on
//!   their way into the TUN and forwarding then drops them;
//! - forwarding on the underlay interface, so VIP packets may be routed into the TUN;
//! - policy rule `pref 100 iif <underlay> to <vip> lookup 100`, and the `local` rule moved from
//!   pref 0 to pref 200 so that rule 100 is consulted before the VIP counts as local.
//!
//! The daemon later adds `default dev <tun>` to table 100 (see [`crate::tun`]). The route dies
//! with the TUN, so when the daemon is gone rule 100 finds an empty table, lookup falls through
//! to `local`, and the node serves VIP traffic itself: fail-open.
//!
//! With a [`PersistentTun`] (`tun.owner`), `setup` also creates the TUN device, owned by the
//! user that will run the daemon, and its route (see [`crate::tun::create_persistent`]).
//!
//! Fail-open has one cost: a packet of a connection another node serves (the daemon had
//! forwarded it) reaches the kernel, which answers RST. So `setup` also installs a guard, the
//! nftables table `ringlb_guard`: a TCP packet for the VIP that came neither through the TUN
//! nor over `lo`, is no SYN or RST, and matches no socket of this node's but a listener on
//! every address is dropped, silently. The client
//! sends it again, and the next daemon finds the connection's server (flow recovery in
//! `ringlb_core`). Connections this node serves, and new ones, pass as before. Without the
//! `nft` tool the guard is skipped with a warning. (A listener bound to the VIP itself rather
//! than to every address counts as a socket for any packet to its port, so then the kernel
//! still answers RST.)
//!
//! `teardown` undoes exactly what the state file records and deletes it. Both are idempotent.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Where and how to steer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteeringConfig {
    pub vip: IpAddr,
    /// Interface client traffic arrives on.
    pub underlay: String,
    /// Routing table that holds the route into the TUN.
    pub table: u32,
    /// Preference of the steering rule; must be below `local_pref`.
    pub rule_pref: u32,
    /// Where the `local` rule moves to.
    pub local_pref: u32,
    /// Directory for the state file.
    pub state_dir: PathBuf,
    /// A TUN for an unprivileged daemon, made here rather than by the daemon.
    pub persistent_tun: Option<PersistentTun>,
    /// The TUN device's name: packets that come through it pass the guard.
    pub tun: String,
}

/// The nftables table of the guard (see the module documentation).
pub const GUARD_TABLE: &str = "ringlb_guard";

/// A TUN device that `setup` creates for a daemon that runs without privilege.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentTun {
    pub name: String,
    pub mtu: u16,
    /// The uid that runs `ringlb node`.
    pub owner: u32,
}

/// Errors of setup and teardown.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("underlay interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("state file {path} is corrupt: {source}")]
    State { path: PathBuf, source: serde_json::Error },
    #[error("only IPv4 VIPs are supported so far, got {0}")]
    Ipv6(IpAddr),
    #[error("no TUN device {0:?}: with tun.owner set, `ringlb setup` (as root) creates it")]
    NoTun(String),
    #[error("tun.name = {0:?}: refusing to touch that interface: {1}")]
    NotOurTun(String, &'static str),
}

/// What setup changed, to be undone by teardown.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Undo {
    /// (sysctl path under /proc/sys, value before setup).
    sysctls: Vec<(String, String)>,
    added_vip_on_lo: bool,
    added_rule: bool,
    moved_local_rule: bool,
    /// A persistent TUN made for an unprivileged daemon.
    #[serde(default)]
    created_tun: Option<String>,
    /// The nftables guard.
    #[serde(default)]
    added_guard: bool,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SteeringError + '_ {
    move |source| SteeringError::Io { path: path.to_owned(), source }
}

impl SteeringConfig {
    /// The state file of this network namespace; its inode number makes it unique per
    /// namespace, so nodes in different namespaces on one host never share it.
    fn state_file(&self) -> Result<PathBuf, SteeringError> {
        let ns = fs::read_link("/proc/self/ns/net").map_err(io_err(Path::new("/proc/self/ns/net")))?;
        let ns = ns.to_string_lossy().chars().filter(char::is_ascii_digit).collect::<String>();
        Ok(self.state_dir.join(format!("steering-{ns}.json")))
    }

    fn sysctls(&self) -> Vec<(String, &'static str)> {
        vec![
            ("net/ipv4/ip_early_demux".into(), "0"),
            ("net/ipv4/conf/all/arp_ignore".into(), "1"),
            ("net/ipv4/conf/all/arp_announce".into(), "2"),
            (format!("net/ipv4/conf/{}/forwarding", self.underlay), "1"),
        ]
    }

    fn vip_v4(&self) -> Result<(), SteeringError> {
        match self.vip {
            IpAddr::V4(_) => Ok(()),
            v6 => Err(SteeringError::Ipv6(v6)),
        }
    }

    /// Applies the steering; safe to run again.
    pub fn setup(&self) -> Result<(), SteeringError> {
        self.vip_v4()?;
        if !Path::new("/sys/class/net").join(&self.underlay).exists() {
            return Err(SteeringError::NoSuchInterface(self.underlay.clone()));
        }
        let path = self.state_file()?;
        let mut undo = read_undo(&path)?.unwrap_or_default();
        let first_run = undo == Undo::default();
        fs::create_dir_all(&self.state_dir).map_err(io_err(&self.state_dir))?;

        for (key, value) in self.sysctls() {
            let old = read_sysctl(&key)?;
            if first_run || !undo.sysctls.iter().any(|(k, _)| *k == key) {
                undo.sysctls.push((key.clone(), old.clone()));
            }
            if old != value {
                write_sysctl(&key, value)?;
            }
        }
        let vip = format!("{}/32", self.vip);
        if !ip_json(&["addr", "show", "dev", "lo"])?.contains(&format!("\"local\":\"{}\"", self.vip)) {
            ip(&["addr", "add", &vip, "dev", "lo"])?;
            undo.added_vip_on_lo = true;
        }
        let rules = rules()?;
        let pref = self.rule_pref.to_string();
        let table = self.table.to_string();
        if !rules.iter().any(|r| r.priority == self.rule_pref) {
            ip(&["rule", "add", "pref", &pref, "iif", &self.underlay, "to", &vip, "lookup", &table])?;
            undo.added_rule = true;
        }
        if !rules.iter().any(|r| r.priority == self.local_pref && r.table == "local") {
            ip(&["rule", "add", "pref", &self.local_pref.to_string(), "lookup", "local"])?;
        }
        if rules.iter().any(|r| r.priority == 0 && r.table == "local") {
            ip(&["rule", "del", "pref", "0", "lookup", "local"])?;
            undo.moved_local_rule = true;
        }
        match self.install_guard() {
            Ok(()) => undo.added_guard = true,
            Err(e) => tracing::warn!(
                error = %e,
                "no guard: while no daemon runs, packets of connections served elsewhere that reach this node are answered with RST"
            ),
        }
        if let Some(t) = &self.persistent_tun {
            if undo.created_tun.is_none() && !Path::new("/sys/class/net").join(&t.name).exists() {
                undo.created_tun = Some(t.name.clone());
            }
            // Recorded first: a failure below still leaves teardown able to remove it.
            write_undo(&path, &undo)?;
            crate::tun::create_persistent(&t.name, t.mtu, self.vip, self.table, t.owner)?;
            tracing::info!(tun = %t.name, owner = t.owner, mtu = t.mtu, "persistent TUN ready for an unprivileged daemon");
        }
        write_undo(&path, &undo)?;
        tracing::info!(state = %path.display(), "steering set up");
        Ok(())
    }

    /// Undoes what `setup` recorded; without a state file there is nothing to undo.
    pub fn teardown(&self) -> Result<(), SteeringError> {
        let path = self.state_file()?;
        let Some(undo) = read_undo(&path)? else {
            tracing::info!(state = %path.display(), "no steering state: nothing to tear down");
            return Ok(());
        };
        if let Some(name) = &undo.created_tun {
            if Path::new("/sys/class/net").join(name).exists() {
                ip(&["link", "del", name])?;
            }
        }
        if undo.added_guard {
            // Declared first, so that a table someone else removed is no error.
            nft(&format!("table ip {GUARD_TABLE}\ndelete table ip {GUARD_TABLE}\n"))?;
        }
        let rules = rules()?;
        if undo.moved_local_rule {
            if !rules.iter().any(|r| r.priority == 0 && r.table == "local") {
                ip(&["rule", "add", "pref", "0", "lookup", "local"])?;
            }
            if rules.iter().any(|r| r.priority == self.local_pref && r.table == "local") {
                ip(&["rule", "del", "pref", &self.local_pref.to_string(), "lookup", "local"])?;
            }
        }
        if undo.added_rule && rules.iter().any(|r| r.priority == self.rule_pref) {
            ip(&["rule", "del", "pref", &self.rule_pref.to_string()])?;
        }
        if undo.added_vip_on_lo {
            let _ = ip(&["addr", "del", &format!("{}/32", self.vip), "dev", "lo"]);
        }
        for (key, value) in undo.sysctls.iter().rev() {
            // An interface may have gone since; its sysctls went with it.
            if Path::new("/proc/sys").join(key).exists() {
                write_sysctl(key, value)?;
            }
        }
        fs::remove_file(&path).map_err(io_err(&path))?;
        tracing::info!("steering torn down");
        Ok(())
    }
}

impl SteeringConfig {
    /// The guard's rules, replacing any earlier version of them. A packet that bypassed the
    /// TUN and `lo`, neither SYN nor RST: dropped if only a wildcard listener would take it (the
    /// kernel would answer RST), passed if any other socket matches (a connection, one in its
    /// handshake, one in TIME_WAIT), dropped if none does.
    fn guard_rules(&self) -> String {
        let (vip, tun) = (self.vip, &self.tun);
        let stray = format!("ip daddr {vip} iifname != {{ \"{tun}\", \"lo\" }} tcp flags & (syn | rst) == 0");
        format!(
            "table ip {GUARD_TABLE}\ndelete table ip {GUARD_TABLE}\ntable ip {GUARD_TABLE} {{\n  chain input {{\n    \
             type filter hook input priority filter; policy accept;\n    \
             {stray} socket wildcard 1 counter drop\n    \
             {stray} socket transparent {{ 0, 1 }} accept\n    \
             {stray} counter drop\n  }}\n}}\n"
        )
    }

    fn install_guard(&self) -> Result<(), SteeringError> {
        nft(&self.guard_rules())?;
        tracing::info!(
            table = GUARD_TABLE,
            "guard installed: stray packets of connections served elsewhere are dropped, not reset"
        );
        Ok(())
    }
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> Result<(), SteeringError> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| SteeringError::Io { path: PathBuf::from("nft"), source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| SteeringError::Io { path: PathBuf::from("nft"), source })?;
    }
    let out = child.wait_with_output().map_err(|source| SteeringError::Io { path: PathBuf::from("nft"), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SteeringError::Command {
            cmd: "nft -f -".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn read_undo(path: &Path) -> Result<Option<Undo>, SteeringError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| SteeringError::State { path: path.to_owned(), source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn write_undo(path: &Path, undo: &Undo) -> Result<(), SteeringError> {
    let tmp = path.with_extension("tmp");
    let json =
        serde_json::to_vec_pretty(undo).map_err(|source| SteeringError::State { path: path.to_owned(), source })?;
    fs::write(&tmp, json).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

pub(crate) fn read_sysctl(key: &str) -> Result<String, SteeringError> {
    let path = Path::new("/proc/sys").join(key);
    fs::read_to_string(&path).map(|s| s.trim().to_owned()).map_err(io_err(&path))
}

pub(crate) fn write_sysctl(key: &str, value: &str) -> Result<(), SteeringError> {
    let path = Path::new("/proc/sys").join(key);
    fs::write(&path, value).map_err(io_err(&path))
}

/// Runs `ip ARGS`, turning a failure into an error carrying its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String, SteeringError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| SteeringError::Io { path: PathBuf::from("ip"), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SteeringError::Command {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn ip_json(args: &[&str]) -> Result<String, SteeringError> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    ip(&all)
}

#[derive(Debug, Deserialize)]
struct Rule {
    priority: u32,
    #[serde(default)]
    table: String,
}

fn rules() -> Result<Vec<Rule>, SteeringError> {
    let json = ip_json(&["-4", "rule", "show"])?;
    serde_json::from_str(&json)
        .map_err(|source| SteeringError::State { path: PathBuf::from("ip -j rule show"), source })
}
