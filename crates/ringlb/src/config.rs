//! Configuration: figment layers `defaults → TOML file → RINGLB_ env (split "__") → CLI flags`,
//! then validation that names every bad key and value before the process exits.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ringlb_dataplane::CarrierKind;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    #[serde(default)]
    pub tun: TunSection,
    #[serde(default)]
    pub carrier: CarrierSection,
    #[serde(default)]
    pub steering: SteeringSection,
    #[serde(default)]
    pub flows: FlowsSection,
    #[serde(default)]
    pub placement: PlacementSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub failure: FailureSection,
    /// The QUIC control plane; without it the member list below is static.
    #[serde(default)]
    pub control: Option<ControlSection>,
    /// How the network learns that this node takes VIP traffic.
    #[serde(default)]
    pub entry: EntrySection,
    /// Checks of the app on the VIP; while they fail, the node takes no new flows.
    #[serde(default)]
    pub health: HealthSection,
    #[serde(default)]
    pub log: LogSection,
    /// How entries share new flows between their own site and the others.
    #[serde(default)]
    pub sites: SitesSection,
    /// The optional kernel fast path for established flows (eBPF).
    #[serde(default)]
    pub fast_path: FastPathSection,
    /// Members known in advance, this node included. With a control plane, the rest are
    /// learned from the seeds and this may list only this node, or nothing when
    /// `node.address` is set.
    #[serde(default)]
    pub members: Vec<MemberEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Address and UDP port of this node's QUIC endpoint; peers reach it there.
    pub listen: SocketAddr,
    /// Nodes to join through, as "name@address:port".
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Cluster CA certificate, this node's certificate and key (`ringlb cert`).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub probe_interval: Duration,
    #[serde(default = "default_suspicion_timeout", with = "humantime_serde")]
    pub suspicion_timeout: Duration,
    #[serde(default = "default_load_interval", with = "humantime_serde")]
    pub load_interval: Duration,
    /// How long a dead or left member is remembered before its name and address are free.
    #[serde(default = "default_dead_expiry", with = "humantime_serde")]
    pub dead_expiry: Duration,
    /// Most members, this node included; more are refused and counted.
    #[serde(default = "default_max_members")]
    pub max_members: usize,
    /// Largest weight a member may announce; larger ones are clamped to it and counted.
    #[serde(default = "default_max_weight")]
    pub max_weight: f64,
    /// Most QUIC handshakes in progress at once (beyond a quarter, clients must answer a Retry).
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
}

impl ControlSection {
    /// The cluster state machine's timers and bounds.
    pub fn cluster_config(&self) -> ringlb_core::ClusterConfig {
        ringlb_core::ClusterConfig {
            probe_interval: self.probe_interval,
            suspicion_timeout: self.suspicion_timeout,
            dead_expiry: self.dead_expiry,
            max_members: self.max_members,
            #[allow(clippy::cast_possible_truncation)] // validated to at most 1e6
            max_weight: self.max_weight as f32,
            ..ringlb_core::ClusterConfig::default()
        }
    }
}

fn default_probe_interval() -> Duration {
    ringlb_core::ClusterConfig::default().probe_interval
}
fn default_suspicion_timeout() -> Duration {
    ringlb_core::ClusterConfig::default().suspicion_timeout
}
fn default_dead_expiry() -> Duration {
    ringlb_core::ClusterConfig::default().dead_expiry
}
fn default_max_members() -> usize {
    ringlb_core::ClusterConfig::default().max_members
}
fn default_max_weight() -> f64 {
    f64::from(ringlb_core::ClusterConfig::default().max_weight)
}
fn default_max_handshakes() -> usize {
    ringlb_control::Limits::default().max_handshakes
}
fn default_load_interval() -> Duration {
    Duration::from_millis(250)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcpOnFailure {
    Reset,
    Replace,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailureSection {
    /// TCP flows pinned to a member that died: "reset" (the client reconnects at once) or
    /// "replace" (place anew). UDP flows are always placed anew.
    pub tcp: TcpOnFailure,
    /// A member whose load vectors stop for this long takes no new flows.
    #[serde(with = "humantime_serde")]
    pub load_stale_after: Duration,
}

impl Default for FailureSection {
    fn default() -> Self {
        FailureSection { tcp: TcpOnFailure::Reset, load_stale_after: Duration::from_millis(1000) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SitesSection {
    /// `failover`: spill to the nearest other site when this one lacks healthy capacity;
    /// `strict`: never place a new flow outside the entry's site.
    pub mode: SiteModeKind,
    /// Envoy's overprovisioning factor: a site keeps all its new flows while this times its
    /// healthy share of capacity is at least 1.
    pub overprovisioning: f64,
    /// Most of the new flows that may leave the site while it has a healthy member (0 to 1).
    pub max_cross_site_share: f64,
    /// Flows per unit of weight a site carries before it spills for load; unset: it spills
    /// only when members drain or fail.
    pub spill_above: Option<f64>,
    /// Per site, a factor on the share of new flows it takes before the next site is asked
    /// (default 1; 0: only when no other site can).
    pub weights: std::collections::BTreeMap<String, f64>,
}

impl Default for SitesSection {
    fn default() -> Self {
        let d = ringlb_core::sites::SitePolicy::default();
        SitesSection {
            mode: SiteModeKind::Failover,
            overprovisioning: d.overprovisioning,
            max_cross_site_share: d.max_cross_site_share,
            spill_above: d.spill_above,
            weights: std::collections::BTreeMap::new(),
        }
    }
}

/// `[fast_path]`: a tc eBPF program on the underlay interface that carries established flows
/// past the TUN (see `ringlb_fastpath`). Needs CAP_BPF and CAP_NET_ADMIN and a kernel with TCX
/// (6.6+); without them the daemon says why and runs the TUN path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FastPathSection {
    pub enabled: bool,
    /// Most flows offloaded at once; the rest stay on the TUN path.
    pub max_flows: u32,
    /// The packet mark bit(s) the program sets on packets it hands to local delivery, and the
    /// preference of the rule that routes marked packets to the `local` table (it must come
    /// before steering.rule_pref).
    pub mark: u32,
    pub rule_pref: u32,
}

impl Default for FastPathSection {
    fn default() -> Self {
        FastPathSection { enabled: false, max_flows: 65_536, mark: 0x0100_0000, rule_pref: 99 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteModeKind {
    Failover,
    Strict,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's name; must be one of `members`.
    pub name: String,
    /// The service address every member owns.
    pub vip: IpAddr,
    /// Interface client traffic and carrier packets arrive on.
    pub underlay_interface: String,
    /// This node's underlay address, when it is not listed in `members`.
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// This node's capacity weight, when it is not listed in `members`.
    #[serde(default)]
    pub weight: Option<f64>,
    /// How long a stopping daemon (SIGTERM, Ctrl-C) keeps serving the flows that need it before
    /// it leaves anyway; 0 leaves at once.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// The site this node is in (a label: a-z, 0-9, '-'; at most 32). Entries keep new flows in
    /// their own site while it has room, and carrier packets between sites are encrypted.
    #[serde(default = "default_site")]
    pub site: String,
}

fn default_site() -> String {
    "default".into()
}

fn default_stop_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The longest `node.stop_timeout`: a day is longer than any sensible drain, and bounds the
/// deadline's arithmetic.
const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunSection {
    pub name: String,
    /// Defaults to the underlay MTU minus the carrier's overhead.
    pub mtu: Option<u16>,
    /// The user (name or uid) that runs `ringlb node`. When set, `ringlb setup` creates the TUN
    /// device persistently, owned by this user, and the daemon only attaches to it: on the udp
    /// carrier it needs no capability at all. Unset: the daemon creates its own TUN (root).
    pub owner: Option<String>,
}

impl Default for TunSection {
    fn default() -> Self {
        TunSection { name: "ring0".into(), mtu: None, owner: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CarrierSection {
    pub kind: CarrierKind,
    /// UDP port carrier packets are sent to and received on.
    pub port: u16,
    /// Number of sending sockets; the outer source port is chosen among them by flow hash.
    pub source_ports: usize,
    /// Seal every carrier packet (AEAD, keys from the QUIC sessions) and refuse plaintext ones,
    /// not only those between sites.
    pub require_authenticated: bool,
    /// Seal carrier packets to and from members of other sites (the default). Off only where
    /// the links between sites are already private.
    pub seal_between_sites: bool,
    /// How long one carrier key is used before the next takes over.
    #[serde(with = "humantime_serde")]
    pub key_lifetime: Duration,
}

impl Default for CarrierSection {
    fn default() -> Self {
        CarrierSection {
            kind: CarrierKind::Udp,
            port: 6635,
            source_ports: 8,
            require_authenticated: false,
            seal_between_sites: true,
            key_lifetime: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SteeringSection {
    pub table: u32,
    pub rule_pref: u32,
    pub local_pref: u32,
    pub state_dir: PathBuf,
}

impl Default for SteeringSection {
    fn default() -> Self {
        SteeringSection { table: 100, rule_pref: 100, local_pref: 200, state_dir: "/run/ringlb".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsSection {
    pub max: usize,
    /// The share of `max` that flows seen only once (a SYN, a first datagram) may hold; a
    /// flood of spoofed packets takes at most this much.
    pub unconfirmed_share: f64,
    #[serde(with = "humantime_serde")]
    pub tcp_handshake_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_established_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_closing_linger: Duration,
    #[serde(with = "humantime_serde")]
    pub udp_idle: Duration,
}

impl Default for FlowsSection {
    fn default() -> Self {
        let d = ringlb_core::FlowConfig::default();
        FlowsSection {
            max: d.max_flows,
            unconfirmed_share: d.unconfirmed_share,
            tcp_handshake_idle: d.tcp_handshake_idle,
            tcp_established_idle: d.tcp_established_idle,
            tcp_closing_linger: d.tcp_closing_linger,
            udp_idle: d.udp_idle,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    PowerOfTwo,
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSection {
    pub policy: PolicyKind,
    /// How far above the cluster's utilisation a node still serves locally (0.1 = 10 %).
    pub margin: f64,
    /// Seed of the placement RNG; random when unset.
    pub seed: Option<u64>,
}

impl Default for PlacementSection {
    fn default() -> Self {
        PlacementSection { policy: PolicyKind::PowerOfTwo, margin: 0.1, seed: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Where `/metrics` and `/status` are served, read-only (HTTP).
    pub listen: SocketAddr,
    /// The Unix socket for status and actions (drain, undrain, reload): whoever may open it
    /// may act. The CLI talks to it.
    pub socket: PathBuf,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection { listen: SocketAddr::from(([127, 0, 0, 1], 9090)), socket: "/run/ringlb/admin.sock".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A level (error, warn, info, debug, trace) or tracing directives; `--log-level` and
    /// RINGLB_LOG override it. Reloadable.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { level: "info".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthKind {
    /// No checks: the app is taken to be healthy.
    None,
    /// A TCP connection to the VIP's `port` must open.
    Tcp,
    /// `GET path` on the VIP's `port` must answer 2xx or 3xx.
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub check: HealthKind,
    pub port: u16,
    /// http: the path asked for.
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A check not answered within this long failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Successes in a row that make an unhealthy app healthy.
    pub rise: u32,
    /// Failures in a row that make a healthy app unhealthy.
    pub fall: u32,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            check: HealthKind::None,
            port: 80,
            path: "/".into(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
            rise: 2,
            fall: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryMode {
    /// Traffic arrives by a static route, DNS or ECMP that ringlb does not manage.
    None,
    /// While ready, the VIP's route sits in `entry.table` for a routing daemon to announce.
    Bgp,
    /// The cluster elects one node to answer ARP for the VIP on the underlay's segment.
    L2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EntrySection {
    pub mode: EntryMode,
    /// bgp: the kernel routing table that holds `VIP/32 dev <tun>` while this node is ready.
    /// No rule looks it up; the routing daemon exports it.
    pub table: u32,
    /// l2: a peer whose load vectors stop for this long no longer owns the VIP.
    #[serde(with = "humantime_serde")]
    pub takeover_after: Duration,
}

impl Default for EntrySection {
    fn default() -> Self {
        EntrySection { mode: EntryMode::None, table: 201, takeover_after: Duration::from_millis(600) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    pub name: String,
    /// Underlay address.
    pub addr: IpAddr,
    /// Relative capacity; 0 = forwards only.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// Values given on the command line; unset ones leave the lower layers alone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeOverrides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier: Option<CarrierOverrides>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay_interface: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CarrierOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// Loads and validates the configuration. The error lists every problem found.
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, String> {
    let mut fig = Figment::new();
    if let Some(file) = file {
        if !file.exists() {
            return Err(format!("config file {} does not exist", file.display()));
        }
        fig = fig.merge(Toml::file(file));
    }
    fig = fig.merge(Env::prefixed("RINGLB_").split("__").ignore(&["config"])).merge(Serialized::defaults(overrides));
    let config: Config = fig.extract().map_err(|e| {
        // serde stops at the first bad value; each section read on its own finds the rest.
        let mut all: Vec<String> = e.into_iter().map(|e| describe(&fig, &e)).collect();
        all.extend(section_errors(&fig));
        all.sort();
        all.dedup();
        all.join("\n")
    })?;
    let problems = config.problems();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems.into_iter().map(|p| format!("config error: {p}")).collect::<Vec<_>>().join("\n"))
    }
}

/// Parses a seed "name@address:port".
pub fn parse_seed(seed: &str) -> Option<(String, SocketAddr)> {
    let (name, addr) = seed.split_once('@')?;
    Some((name.to_owned(), addr.parse().ok()?)).filter(|(n, _)| ringlb_control::certs::valid_name(n))
}

/// One figment error as `config error: KEY = VALUE: PROBLEM (in SOURCE)`.
fn describe(fig: &Figment, e: &figment::Error) -> String {
    describe_in(fig, e, None)
}

/// [`describe`] for an error of `section` read on its own (whose path figment gives in its own
/// order).
fn describe_in(fig: &Figment, e: &figment::Error, section: Option<&str>) -> String {
    use figment::error::Kind;
    let mut key = match section {
        None => e.path.join("."),
        Some(sec) => std::iter::once(sec)
            .chain(e.path.iter().map(String::as_str).filter(|p| *p != sec))
            .collect::<Vec<_>>()
            .join("."),
    };
    if let Kind::UnknownField(field, _) = &e.kind {
        key = if key.is_empty() { field.clone() } else { format!("{key}.{field}") };
    }
    let value = fig.find_value(&key).ok().map(|v| match v {
        figment::value::Value::String(_, s) => format!(" = {s:?}"),
        other => match (other.to_i128(), other.to_f64()) {
            (Some(i), _) => format!(" = {i}"),
            (None, Some(f)) => format!(" = {f}"),
            (None, None) => String::new(),
        },
    });
    let source = e
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(figment::Source::File(path)) => format!(" (in {})", path.display()),
            _ => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    format!("config error: {key}{}: {}{source}", value.unwrap_or_default(), plain_types(&e.kind.to_string()))
}

/// Every section read on its own, for the errors the whole read did not reach.
fn section_errors(fig: &Figment) -> Vec<String> {
    fn each<T: serde::de::DeserializeOwned>(fig: &Figment, key: &str, out: &mut Vec<String>) {
        if fig.find_value(key).is_ok() {
            if let Err(e) = fig.extract_inner::<T>(key) {
                out.extend(e.into_iter().map(|e| describe_in(fig, &e, Some(key))));
            }
        }
    }
    let mut out = Vec::new();
    each::<NodeSection>(fig, "node", &mut out);
    each::<TunSection>(fig, "tun", &mut out);
    each::<CarrierSection>(fig, "carrier", &mut out);
    each::<SteeringSection>(fig, "steering", &mut out);
    each::<FlowsSection>(fig, "flows", &mut out);
    each::<PlacementSection>(fig, "placement", &mut out);
    each::<AdminSection>(fig, "admin", &mut out);
    each::<FailureSection>(fig, "failure", &mut out);
    each::<ControlSection>(fig, "control", &mut out);
    each::<EntrySection>(fig, "entry", &mut out);
    each::<HealthSection>(fig, "health", &mut out);
    each::<Vec<MemberEntry>>(fig, "members", &mut out);
    out
}

/// serde's messages name Rust types ("expected u16"); operators want what is allowed.
fn plain_types(message: &str) -> String {
    [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u32", "expected a whole number from 0 to 4294967295"),
        ("expected u64", "expected a whole number from 0 up"),
        ("expected usize", "expected a whole number from 0 up"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a boolean", "expected true or false"),
        ("expected a string", "expected a quoted string"),
    ]
    .iter()
    .fold(message.to_owned(), |m, (from, to)| m.replace(from, to))
}

impl Config {
    /// How this node tells the network it takes VIP traffic, if ringlb does that at all.
    pub fn entry_mechanism(&self) -> Option<ringlb_core::entry::Mechanism> {
        match self.entry.mode {
            EntryMode::None => None,
            EntryMode::Bgp => Some(ringlb_core::entry::Mechanism::Bgp),
            EntryMode::L2 => Some(ringlb_core::entry::Mechanism::L2),
        }
    }

    fn health_problems(&self, p: &mut Vec<String>) {
        let h = &self.health;
        if h.check == HealthKind::None {
            return;
        }
        if h.interval < Duration::from_millis(50) || h.interval > Duration::from_secs(3600) {
            p.push(format!("health.interval = {:?}: must be 50ms to 1h", h.interval));
        }
        if h.timeout.is_zero() || h.timeout > h.interval {
            p.push(format!(
                "health.timeout = {:?}: must be above 0 and at most health.interval ({:?})",
                h.timeout, h.interval
            ));
        }
        for (key, v) in [("health.rise", h.rise), ("health.fall", h.fall)] {
            if !(1..=100).contains(&v) {
                p.push(format!("{key} = {v}: must be 1 to 100"));
            }
        }
        if h.port == 0 {
            p.push("health.port = 0: must be the app's port on the VIP".into());
        }
        if h.check == HealthKind::Http
            && (!h.path.starts_with('/') || h.path.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            p.push(format!("health.path = {:?}: must start with '/' and hold no spaces", h.path));
        }
    }

    fn entry_problems(&self, p: &mut Vec<String>) {
        let e = &self.entry;
        if e.mode == EntryMode::Bgp && self.tun.owner.is_some() {
            p.push(
                "entry.mode = \"bgp\" with tun.owner: the announced route goes through the TUN, and a persistent \
                 TUN outlives the daemon, so a dead daemon would stay announced; run the bgp entry without tun.owner"
                    .into(),
            );
        }
        if e.mode == EntryMode::Bgp {
            // 0 is unspecified, 253 to 255 are default, main and local.
            if e.table == 0 || e.table >= 253 || e.table == self.steering.table {
                p.push(format!(
                    "entry.table = {}: must be 1 to 252 and differ from steering.table ({})",
                    e.table, self.steering.table
                ));
            }
        }
        if e.mode == EntryMode::L2 {
            match &self.control {
                None => p.push("entry.mode = \"l2\": needs [control]: the owner is elected from the membership".into()),
                Some(c) if e.takeover_after < 2 * c.load_interval => p.push(format!(
                    "entry.takeover_after = {:?}: must be at least twice control.load_interval ({:?}), or one late \
                     load vector moves the VIP",
                    e.takeover_after, c.load_interval
                )),
                Some(_) => {}
            }
        }
    }

    /// Everything wrong with the values, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !matches!(self.node.vip, IpAddr::V4(_)) {
            p.push(format!("node.vip = {:?}: only IPv4 VIPs are supported so far", self.node.vip.to_string()));
        } else if self.node.vip.is_unspecified() || self.node.vip.is_multicast() {
            p.push(format!("node.vip = {:?}: not a unicast address", self.node.vip.to_string()));
        }
        if self.node.underlay_interface.is_empty() {
            p.push("node.underlay_interface = \"\": must name an interface".into());
        }
        if self.local_member().is_none() {
            p.push(format!("node.name = {:?}: not among members, and node.address is not set", self.node.name));
        }
        let site = &self.node.site;
        if site.is_empty()
            || site.len() > 32
            || !site.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            p.push(format!("node.site = {site:?}: must be 1 to 32 characters of a-z, 0-9, '-'"));
        }
        if self.node.stop_timeout > MAX_STOP_TIMEOUT {
            p.push(format!("node.stop_timeout = {:?}: must be at most 1 day", self.node.stop_timeout));
        }
        if self.control.is_none() && self.members.is_empty() {
            p.push("members: empty, and there is no [control] to learn them from".into());
        }
        if let Some(c) = &self.control {
            if !ringlb_control::certs::valid_name(&self.node.name) {
                p.push(format!(
                    "node.name = {:?}: with [control] it is a certificate name: a-z, 0-9, '-'",
                    self.node.name
                ));
            }
            for (i, seed) in c.seeds.iter().enumerate() {
                if parse_seed(seed).is_none() {
                    p.push(format!("control.seeds[{i}] = {seed:?}: expected \"name@address:port\""));
                }
            }
            for (key, d) in [
                ("control.probe_interval", c.probe_interval),
                ("control.suspicion_timeout", c.suspicion_timeout),
                ("control.load_interval", c.load_interval),
                ("control.dead_expiry", c.dead_expiry),
            ] {
                if d.is_zero() {
                    p.push(format!("{key} = \"0s\": must be longer than zero"));
                }
            }
            if c.listen.ip().is_unspecified() {
                p.push(format!(
                    "control.listen = \"{}\": must be this node's own address (peers reach it there, and its certificate names it)",
                    c.listen
                ));
            }
            if !(2..=65_535).contains(&c.max_members) {
                p.push(format!("control.max_members = {}: must be 2 to 65535", c.max_members));
            }
            if !c.max_weight.is_finite() || !(0.0..=1e6).contains(&c.max_weight) {
                p.push(format!("control.max_weight = {}: must be a number from 0 to 1000000", c.max_weight));
            }
            if !(1..=100_000).contains(&c.max_handshakes) {
                p.push(format!("control.max_handshakes = {}: must be 1 to 100000", c.max_handshakes));
            }
            if let Some(w) = self.local_member().map(|m| m.weight).filter(|w| w.is_finite() && *w > c.max_weight) {
                p.push(format!("node.weight = {w}: above control.max_weight ({})", c.max_weight));
            }
        }
        self.entry_problems(&mut p);
        self.health_problems(&mut p);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(format!("log.level = {:?}: {e} (try error, warn, info, debug or trace)", self.log.level));
        }
        if let Some(owner) = &self.tun.owner {
            if owner.is_empty() || owner.contains(':') || owner.contains('\n') {
                p.push(format!("tun.owner = {owner:?}: expected a user name or a uid"));
            }
        }
        if let Some(w) = self.node.weight.filter(|w| !w.is_finite() || *w < 0.0 || *w > 1e6) {
            p.push(format!("node.weight = {w}: must be a number from 0 to 1000000"));
        }
        for (i, m) in self.members.iter().enumerate() {
            if !m.weight.is_finite() || !(0.0..=1e6).contains(&m.weight) {
                p.push(format!("members[{i}].weight = {}: must be a number from 0 to 1000000", m.weight));
            }
            if self.members[..i].iter().any(|o| o.name == m.name) {
                p.push(format!("members[{i}].name = {:?}: duplicate", m.name));
            }
            if self.members[..i].iter().any(|o| o.addr == m.addr) {
                p.push(format!("members[{i}].addr = {:?}: duplicate", m.addr.to_string()));
            }
            if m.addr == self.node.vip {
                p.push(format!("members[{i}].addr = {:?}: the VIP cannot be an underlay address", m.addr.to_string()));
            }
        }
        if self.tun.name.is_empty() || self.tun.name.len() > 15 {
            p.push(format!("tun.name = {:?}: must be 1 to 15 characters", self.tun.name));
        }
        if let Some(mtu) = self.tun.mtu {
            if !(576..=9000).contains(&mtu) {
                p.push(format!("tun.mtu = {mtu}: must be 576 to 9000"));
            }
        }
        if self.carrier.port == 0 {
            p.push("carrier.port = 0: must be a port number".into());
        }
        // A receiver derives 3 epochs ahead; a link cut for 3 lifetimes (15 s at the least)
        // also ends the QUIC session (10 s idle), and the next one brings new keys.
        if !(Duration::from_secs(5)..=Duration::from_secs(86_400)).contains(&self.carrier.key_lifetime) {
            p.push(format!("carrier.key_lifetime = {:?}: must be 5 s to 1 day", self.carrier.key_lifetime));
        }
        if self.control.is_none() && self.node.site != default_site() {
            p.push(format!(
                "node.site = {:?}: needs [control]: members learn each other's sites from their records",
                self.node.site
            ));
        }
        if self.carrier.require_authenticated && self.control.is_none() {
            p.push(
                "carrier.require_authenticated = true: needs [control]: carrier keys come from its QUIC sessions"
                    .into(),
            );
        }
        if self.carrier.require_authenticated && self.carrier.kind != CarrierKind::Udp {
            p.push(
                "carrier.require_authenticated = true: needs carrier.kind = \"udp\" (the sealed carrier is IP-in-UDP)"
                    .into(),
            );
        }
        if !(1..=64).contains(&self.carrier.source_ports) {
            p.push(format!("carrier.source_ports = {}: must be 1 to 64", self.carrier.source_ports));
        }
        if self.steering.rule_pref == 0 || self.steering.rule_pref >= self.steering.local_pref {
            p.push(format!(
                "steering.rule_pref = {}: must be above 0 and below steering.local_pref ({})",
                self.steering.rule_pref, self.steering.local_pref
            ));
        }
        if matches!(self.steering.table, 0 | 253..=255) {
            p.push(format!("steering.table = {}: reserved table", self.steering.table));
        }
        if !(1..=(1 << 31)).contains(&self.flows.max) {
            p.push(format!("flows.max = {}: must be 1 to 2^31", self.flows.max));
        }
        let share = self.flows.unconfirmed_share;
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            p.push(format!("flows.unconfirmed_share = {share}: must be above 0 and at most 1"));
        }
        for (key, d) in [
            ("flows.tcp_handshake_idle", self.flows.tcp_handshake_idle),
            ("flows.tcp_established_idle", self.flows.tcp_established_idle),
            ("flows.tcp_closing_linger", self.flows.tcp_closing_linger),
            ("flows.udp_idle", self.flows.udp_idle),
        ] {
            if d.is_zero() {
                p.push(format!("{key} = \"0s\": must be longer than zero"));
            }
        }
        let sites = &self.sites;
        if !sites.overprovisioning.is_finite() || !(1.0..=10.0).contains(&sites.overprovisioning) {
            p.push(format!("sites.overprovisioning = {}: must be 1 to 10", sites.overprovisioning));
        }
        if !(0.0..=1.0).contains(&sites.max_cross_site_share) {
            p.push(format!("sites.max_cross_site_share = {}: must be 0 to 1", sites.max_cross_site_share));
        }
        for (site, w) in &sites.weights {
            if !ringlb_core::cluster::message::valid_site(site) {
                p.push(format!("sites.weights.{site} = {w}: not a site name (a-z, 0-9, '-')"));
            } else if !w.is_finite() || !(0.0..=100.0).contains(w) {
                p.push(format!("sites.weights.{site} = {w}: must be a number from 0 to 100"));
            }
        }
        if let Some(s) = sites.spill_above.filter(|s| !s.is_finite() || *s <= 0.0) {
            p.push(format!("sites.spill_above = {s}: must be a number above 0 (flows per unit of weight)"));
        }
        let fp = &self.fast_path;
        if fp.enabled {
            if !(1..=(1 << 24)).contains(&fp.max_flows) {
                p.push(format!("fast_path.max_flows = {}: must be 1 to 16777216", fp.max_flows));
            }
            if fp.mark == 0 {
                p.push("fast_path.mark = 0: must have at least one bit set".into());
            }
            if fp.rule_pref == 0 || fp.rule_pref >= self.steering.rule_pref {
                p.push(format!(
                    "fast_path.rule_pref = {}: must be above 0 and below steering.rule_pref ({})",
                    fp.rule_pref, self.steering.rule_pref
                ));
            }
            if !self.node.vip.is_ipv4() {
                p.push(format!("fast_path.enabled = true: node.vip = {}: only IPv4 VIPs are offloaded", self.node.vip));
            }
            // The daemon reads the program's usage back every second; a shorter idle timeout
            // could expire a flow the kernel keeps busy.
            for (key, d) in [
                ("flows.tcp_established_idle", self.flows.tcp_established_idle),
                ("flows.udp_idle", self.flows.udp_idle),
            ] {
                if d < Duration::from_secs(10) {
                    p.push(format!("{key} = {d:?}: must be at least 10s with fast_path.enabled"));
                }
            }
        }
        if !self.placement.margin.is_finite() || self.placement.margin < 0.0 {
            p.push(format!("placement.margin = {}: must be a finite number >= 0", self.placement.margin));
        }
        p
    }

    /// Checks what only the running host can tell: that the underlay interface exists.
    pub fn check_host(&self) -> Result<(), String> {
        let ifname = &self.node.underlay_interface;
        if Path::new("/sys/class/net").join(ifname).exists() {
            Ok(())
        } else {
            Err(format!("config error: node.underlay_interface = {ifname:?}: no such interface on this host"))
        }
    }

    /// What `ringlb check` verifies on this host beyond the values: the interface, the
    /// certificate files, and that the certificate names this node and its addresses.
    pub fn host_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = self.check_host() {
            p.push(e);
        }
        let Some(c) = &self.control else { return p };
        for (key, path) in [("control.ca", &c.ca), ("control.cert", &c.cert), ("control.key", &c.key)] {
            if let Err(e) = std::fs::File::open(path) {
                p.push(format!("{key} = {:?}: {e}", path.display().to_string()));
            }
        }
        match ringlb_control::certs::read_info(&c.cert) {
            Ok(info) => {
                if info.names.first() != Some(&self.node.name) {
                    p.push(format!(
                        "control.cert = {:?}: names {:?}, but node.name is {:?}",
                        c.cert.display().to_string(),
                        info.names,
                        self.node.name
                    ));
                }
                let underlay = self.local_member().map(|m| m.addr);
                for (key, addr) in [("node.address", underlay), ("control.listen", Some(c.listen.ip()))] {
                    if let Some(a) = addr.filter(|a| !info.addrs.contains(a)) {
                        p.push(format!(
                            "{key} = {:?}: not among control.cert's addresses {:?}",
                            a.to_string(),
                            info.addrs.iter().map(ToString::to_string).collect::<Vec<_>>()
                        ));
                    }
                }
            }
            Err(e) => p.push(format!("control.cert: {e}")),
        }
        p
    }

    /// This node as a member: from `members`, or from `node.address` and `node.weight`.
    pub fn local_member(&self) -> Option<MemberEntry> {
        if let Some(m) = self.members.iter().find(|m| m.name == self.node.name) {
            return Some(m.clone());
        }
        self.node.address.map(|addr| MemberEntry {
            name: self.node.name.clone(),
            addr,
            weight: self.node.weight.unwrap_or(1.0),
        })
    }

    pub fn steering(&self) -> ringlb_dataplane::steering::SteeringConfig {
        ringlb_dataplane::steering::SteeringConfig {
            vip: self.node.vip,
            underlay: self.node.underlay_interface.clone(),
            table: self.steering.table,
            rule_pref: self.steering.rule_pref,
            local_pref: self.steering.local_pref,
            state_dir: self.steering.state_dir.clone(),
            persistent_tun: None,
            tun: self.tun.name.clone(),
        }
    }

    /// What `ringlb setup` does: the steering, and with `tun.owner` the persistent TUN.
    pub fn setup_steering(&self) -> Result<ringlb_dataplane::steering::SteeringConfig, String> {
        let mut steering = self.steering();
        if let Some(owner) = &self.tun.owner {
            steering.persistent_tun = Some(ringlb_dataplane::steering::PersistentTun {
                name: self.tun.name.clone(),
                mtu: self.tun_mtu()?,
                owner: resolve_user(owner, Path::new("/etc/passwd"))?,
            });
        }
        Ok(steering)
    }

    /// The TUN's MTU: `tun.mtu`, or the underlay's minus the carrier's overhead (at most 9000:
    /// the data plane's segment buffers are sized for jumbo frames, no more).
    pub fn tun_mtu(&self) -> Result<u16, String> {
        if let Some(m) = self.tun.mtu {
            return Ok(m);
        }
        let path = format!("/sys/class/net/{}/mtu", self.node.underlay_interface);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let mtu: u32 = text.trim().parse().map_err(|_| format!("{path} holds {text:?}"))?;
        let mtu = u16::try_from(mtu.min(65_535)).unwrap_or(u16::MAX);
        Ok(mtu.saturating_sub(self.carrier_overhead()).min(9000))
    }

    /// Bytes a carrier packet adds at most: with a control plane, the udp carrier may be sealed
    /// (to other sites, or everywhere), and the TUN leaves room for that.
    pub fn carrier_overhead(&self) -> u16 {
        // (Over ipip, a sealed packet rides the raw socket like any inner packet.)
        let sealed = self.control.is_some();
        self.carrier.kind.overhead()
            + if sealed { u16::try_from(ringlb_core::seal::OVERHEAD).unwrap_or(u16::MAX) } else { 0 }
    }

    pub fn site_policy(&self) -> ringlb_core::sites::SitePolicy {
        ringlb_core::sites::SitePolicy {
            mode: match self.sites.mode {
                SiteModeKind::Failover => ringlb_core::sites::SiteMode::Failover,
                SiteModeKind::Strict => ringlb_core::sites::SiteMode::Strict,
            },
            overprovisioning: self.sites.overprovisioning,
            max_cross_site_share: self.sites.max_cross_site_share,
            spill_above: self.sites.spill_above,
        }
    }

    pub fn flow_config(&self) -> ringlb_core::FlowConfig {
        ringlb_core::FlowConfig {
            max_flows: self.flows.max,
            unconfirmed_share: self.flows.unconfirmed_share,
            tcp_handshake_idle: self.flows.tcp_handshake_idle,
            tcp_established_idle: self.flows.tcp_established_idle,
            tcp_closing_linger: self.flows.tcp_closing_linger,
            udp_idle: self.flows.udp_idle,
        }
    }

    pub fn policy(&self) -> ringlb_core::Policy {
        match self.placement.policy {
            PolicyKind::PowerOfTwo => ringlb_core::Policy::PowerOfTwo { margin: self.placement.margin },
            PolicyKind::ConsistentHash => ringlb_core::Policy::ConsistentHash,
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's signature, not ours
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [node]
        name = "n1"
        vip = "10.200.0.10"
        underlay_interface = "eth0"
        [[members]]
        name = "n1"
        addr = "10.77.0.1"
        [[members]]
        name = "n2"
        addr = "10.77.0.2"
        weight = 2
    "#;

    fn check(toml: &str, env: &[(&str, &str)], want: Result<(), &[&str]>) {
        figment::Jail::expect_with(|jail| {
            jail.create_file("ringlb.toml", toml)?;
            for (k, v) in env {
                jail.set_env(k, v);
            }
            let got = load(Some(Path::new("ringlb.toml")), &Overrides::default());
            match (&got, want) {
                (Ok(_), Ok(())) => {}
                (Err(msg), Err(needles)) => {
                    for n in needles {
                        assert!(msg.contains(n), "error {msg:?} lacks {n:?}");
                    }
                }
                _ => panic!("got {got:?}, want {want:?}"),
            }
            Ok(())
        });
    }

    #[test]
    fn good_config_loads_with_defaults() {
        check(GOOD, &[], Ok(()));
        figment::Jail::expect_with(|jail| {
            jail.create_file("ringlb.toml", GOOD)?;
            jail.set_env("RINGLB_FLOWS__UDP_IDLE", "5s");
            let c = load(Some(Path::new("ringlb.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.flows.udp_idle, Duration::from_secs(5), "env layer");
            assert_eq!(c.node.stop_timeout, Duration::from_secs(30), "default");
            assert_eq!(c.carrier.kind, CarrierKind::Udp);
            assert_eq!(c.members[1].weight, 2.0);
            let cli =
                Overrides { carrier: Some(CarrierOverrides { kind: Some("ipip".into()) }), ..Overrides::default() };
            let c = load(Some(Path::new("ringlb.toml")), &cli).unwrap();
            assert_eq!(c.carrier.kind, CarrierKind::Ipip, "cli layer");
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_key_and_value() {
        check(&GOOD.replace("10.200.0.10", "10.200.0.300"), &[], Err(&["node.vip", "10.200.0.300"]));
        check(&format!("{GOOD}\n[placement]\nbogus = 1\n"), &[], Err(&["bogus"]));
        check(
            &GOOD.replace("name = \"n1\"\n        vip", "name = \"n9\"\n        vip"),
            &[],
            Err(&["node.name", "n9"]),
        );
        check(&GOOD.replace("weight = 2", "weight = -2"), &[], Err(&["members[1].weight", "-2"]));
        check(GOOD, &[("RINGLB_NODE__STOP_TIMEOUT", "2days")], Err(&["node.stop_timeout", "172800s"]));
        check(GOOD, &[("RINGLB_NODE__STOP_TIMEOUT", "soon")], Err(&["node.stop_timeout", "soon"]));
        check(GOOD, &[("RINGLB_CARRIER__KIND", "gre")], Err(&["carrier.kind", "gre"]));
        check(&format!("{GOOD}\n[flows]\nunconfirmed_share = 1.5\n"), &[], Err(&["flows.unconfirmed_share", "1.5"]));
        check(GOOD, &[("RINGLB_FLOWS__UNCONFIRMED_SHARE", "0")], Err(&["flows.unconfirmed_share = 0"]));
        check(&format!("{GOOD}\n[flows]\nmax = 20000\nunconfirmed_share = 0.1\n"), &[], Ok(()));
        check(
            GOOD,
            &[("RINGLB_FLOWS__UDP_IDLE", "0s"), ("RINGLB_CARRIER__PORT", "0")],
            Err(&["flows.udp_idle", "carrier.port"]),
        );
    }
}

/// A user name or uid as a uid, from `passwd` (no NSS: a uid always works).
fn resolve_user(user: &str, passwd: &Path) -> Result<u32, String> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(uid);
    }
    let text = std::fs::read_to_string(passwd)
        .map_err(|e| format!("tun.owner = {user:?}: reading {}: {e}", passwd.display()))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse::<u32>().ok()?;
            (name == user).then_some(uid)
        })
        .next()
        .ok_or_else(|| format!("tun.owner = {user:?}: no such user in {} (give a uid instead)", passwd.display()))
}

#[cfg(test)]
mod user_tests {
    use super::resolve_user;

    #[test]
    fn users_resolve_by_name_or_uid() {
        let dir = std::env::temp_dir().join(format!("ringlb-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwd = dir.join("passwd");
        std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/bash\nringlb:x:998:998::/nonexistent:/usr/sbin/nologin\n")
            .unwrap();
        assert_eq!(resolve_user("ringlb", &passwd), Ok(998));
        assert_eq!(resolve_user("65534", &passwd), Ok(65534));
        let err = resolve_user("nobody2", &passwd).unwrap_err();
        assert!(err.contains("tun.owner = \"nobody2\": no such user"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    fn problems(extra: &str) -> Vec<String> {
        let toml = format!(
            "[node]\nname = \"n1\"\nvip = \"10.200.0.10\"\nunderlay_interface = \"eth0\"\n{extra}\n\
             [[members]]\nname = \"n1\"\naddr = \"10.77.0.1\"\n"
        );
        let config: Config = Figment::new().merge(Toml::string(&toml)).extract().expect("parses");
        config.problems()
    }

    #[test]
    fn bad_fast_path_settings_are_named_with_their_values() {
        assert!(
            problems("[fast_path]\nenabled = true\n").is_empty(),
            "{:?}",
            problems("[fast_path]\nenabled = true\n")
        );
        let p = problems("[fast_path]\nenabled = true\nmark = 0\nrule_pref = 150\nmax_flows = 0\n");
        for needle in ["fast_path.mark = 0", "fast_path.rule_pref = 150", "fast_path.max_flows = 0"] {
            assert!(p.iter().any(|m| m.contains(needle)), "{needle} not named in {p:?}");
        }
        let p = problems("[flows]\nudp_idle = \"5s\"\n[fast_path]\nenabled = true\n");
        assert!(p.iter().any(|m| m.contains("flows.udp_idle") && m.contains("fast_path")), "{p:?}");
        // Off, nothing about it is checked.
        assert!(problems("[fast_path]\nmark = 0\n").is_empty());
    }
}
