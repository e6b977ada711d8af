//! The `ringlb` binary: CLI, configuration, and wiring of core, data plane, control plane and
//! admin endpoint.

#![forbid(unsafe_code)]

mod admin;
mod config;
mod edge;
mod health;
mod reload;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ringlb_control::{ControlConfig, ControlEvent, ControlHandle};
use ringlb_core::{Identity, Member, Members, Node, NodeConfig};
use ringlb_dataplane::{Carrier, Driver, NodeUpdate};
use tokio::sync::{mpsc, watch};

use config::{CarrierOverrides, Config, NodeOverrides, Overrides, TcpOnFailure};

/// A decentralized layer-4 load balancer: every node serves and forwards.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file.
    #[arg(long, short, global = true, env = "RINGLB_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides node.name.
    #[arg(long, global = true)]
    name: Option<String>,
    /// Overrides node.vip.
    #[arg(long, global = true)]
    vip: Option<String>,
    /// Overrides node.underlay_interface.
    #[arg(long, global = true)]
    underlay_interface: Option<String>,
    /// Overrides carrier.kind (udp or ipip).
    #[arg(long, global = true)]
    carrier: Option<String>,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives; overrides
    /// log.level in the config.
    #[arg(long, global = true, env = "RINGLB_LOG")]
    log_level: Option<String>,
    /// Log format: text (coloured only on a terminal) or json (one object per line).
    #[arg(long, global = true, env = "RINGLB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the configuration is when neither --config nor RINGLB_CONFIG says.
const DEFAULT_CONFIG: &str = "/etc/ringlb/ringlb.toml";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node daemon (needs `ringlb setup` first).
    Node,
    /// Steer VIP traffic into ringlb: sysctls, VIP on lo, policy rules. Idempotent.
    Setup,
    /// Undo `setup` exactly. Idempotent.
    Teardown,
    /// Validate the configuration and print it as resolved.
    Check,
    /// Print the running node's member table and counters (admin.socket).
    Status {
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print the running node's Prometheus metrics (admin.socket).
    Metrics,
    /// Stop taking new flows on this node; flows it serves finish (admin.socket).
    Drain,
    /// Take new flows again (admin.socket).
    Undrain,
    /// Read the configuration again: weight, health checks, certificates (admin.socket; SIGHUP
    /// does the same).
    Reload,
    /// Cluster certificates.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Create the cluster CA (ca.pem, ca.key) in DIR. Keep ca.key off the nodes: there is no
    /// default, so that it does not land where they read their certificates.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print what certificates say: names, addresses, issuer, validity.
    Show {
        /// PEM files (a node's certificate, or the CA's).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Issue NODE.pem and NODE.key in DIR, signed by the CA there.
    Issue {
        #[arg(long, default_value = "/etc/ringlb/pki")]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        ip: std::net::IpAddr,
        /// Validity in days: at least 1, and not beyond the CA's.
        #[arg(long, default_value_t = 30)]
        days: u64,
    },
}

impl Cli {
    fn overrides(&self) -> Overrides {
        let node =
            (self.name.is_some() || self.vip.is_some() || self.underlay_interface.is_some()).then(|| NodeOverrides {
                name: self.name.clone(),
                vip: self.vip.clone(),
                underlay_interface: self.underlay_interface.clone(),
            });
        let carrier = self.carrier.clone().map(|kind| CarrierOverrides { kind: Some(kind) });
        Overrides { node, carrier }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(cli.log_level.as_deref().unwrap_or("info")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("--log-level / RINGLB_LOG = {:?}: {e} (try error, warn, info, debug or trace)", cli.log_level);
            return ExitCode::from(2);
        }
    };
    let set_log_level = init_logging(filter, cli.log_format);
    if cli.config.is_none() && std::path::Path::new(DEFAULT_CONFIG).exists() {
        cli.config = Some(DEFAULT_CONFIG.into());
    }
    if let Command::Cert(cmd) = &cli.command {
        return match cert(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    // The config's log.level, unless a flag or RINGLB_LOG fixed the filter; a reload may change it.
    let set_log_level = cli.log_level.is_none().then_some(set_log_level);
    if let Some(set) = &set_log_level {
        if let Err(e) = set(&config.log.level) {
            eprintln!("config error: {e}");
            return ExitCode::from(2);
        }
    }
    let source = ConfigSource { file: cli.config.clone(), overrides: cli.overrides(), set_log_level };
    match run(cli.command, config, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cert(cmd: &CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Init { dir } => {
            let path = ringlb_control::certs::init_ca(dir)?;
            println!("created cluster CA {}", path.display());
        }
        CertCommand::Show { files } => {
            for f in files {
                let i = ringlb_control::certs::read_info(f)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                let left = i.not_after - now;
                let addrs: Vec<String> = i.addrs.iter().map(ToString::to_string).collect();
                println!(
                    "{}:\n  subject: {}\n  issuer: {}\n  names: {}\n  addresses: {}\n  valid: unix {} to {} ({})",
                    f.display(),
                    i.subject,
                    i.issuer,
                    if i.names.is_empty() { "-".to_owned() } else { i.names.join(", ") },
                    if addrs.is_empty() { "-".to_owned() } else { addrs.join(", ") },
                    i.not_before,
                    i.not_after,
                    if left > 0 {
                        format!("expires in {:.1} days", left as f64 / 86_400.0)
                    } else {
                        "EXPIRED".to_owned()
                    }
                );
            }
        }
        CertCommand::Issue { dir, node, ip, days } => {
            let path = ringlb_control::certs::issue(dir, node, *ip, Duration::from_secs(days * 86_400))?;
            println!("issued {} for node {node} ({ip}), valid {days} days", path.display());
        }
    }
    Ok(())
}

/// Where the configuration came from (file and flags), to read it again on a reload.
struct ConfigSource {
    file: Option<PathBuf>,
    overrides: Overrides,
    set_log_level: Option<reload::LogLevelSetter>,
}

/// Logs to stderr, as text (coloured only on a terminal) or JSON; returns what changes the filter.
fn init_logging(filter: tracing_subscriber::EnvFilter, format: LogFormat) -> reload::LogLevelSetter {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init(),
        LogFormat::Text => {
            use std::io::IsTerminal as _;
            let ansi = std::io::stderr().is_terminal();
            registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).init();
        }
    }
    std::sync::Arc::new(move |level: &str| {
        let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("log.level = {level:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

fn run(command: Command, config: Config, source: ConfigSource) -> anyhow::Result<()> {
    let admin_call = |command: &str| -> anyhow::Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        match rt.block_on(admin::call(&config.admin.socket, command))? {
            Ok(answer) => Ok(answer),
            Err(error) => anyhow::bail!("{}", error.trim_end()),
        }
    };
    match command {
        Command::Check => {
            let problems = config.host_problems();
            println!("{config:#?}");
            if !problems.is_empty() {
                anyhow::bail!("{}", problems.join("\n"));
            }
        }
        Command::Setup => {
            config.check_host().map_err(anyhow::Error::msg)?;
            config.setup_steering().map_err(anyhow::Error::msg)?.setup()?;
        }
        Command::Teardown => config.steering().teardown()?,
        Command::Status { json } => print!("{}", admin_call(if json { "status-json" } else { "status" })?),
        Command::Metrics => print!("{}", admin_call("metrics")?),
        Command::Drain => print!("{}", admin_call("drain")?),
        Command::Undrain => print!("{}", admin_call("undrain")?),
        Command::Reload => print!("{}", admin_call("reload")?),
        Command::Cert(_) => unreachable!("handled before the config is loaded"),
        Command::Node => {
            config.check_host().map_err(anyhow::Error::msg)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run_node(config, source))?;
        }
    }
    Ok(())
}

fn underlay_mtu(ifname: &str) -> anyhow::Result<u16> {
    let path = format!("/sys/class/net/{ifname}/mtu");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.trim().parse().with_context(|| format!("{path} holds {text:?}"))
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}

/// Loads the kernel fast path when `fast_path.enabled`; on any failure says why and leaves the
/// TUN path to carry everything.
fn start_fast_path(config: &Config, local: IpAddr, driver: Driver) -> Driver {
    let fp = &config.fast_path;
    if !fp.enabled {
        return driver;
    }
    let (IpAddr::V4(vip), IpAddr::V4(local)) = (config.node.vip, local) else {
        tracing::warn!("fast path off: only IPv4 is offloaded; the TUN path carries everything");
        return driver;
    };
    if config.carrier.require_authenticated {
        // Every carrier packet is sealed, and the program sends plaintext only: it would carry
        // nothing but this node's own flows, and cost the carrier socket its receive offload.
        tracing::warn!("fast path off: carrier.require_authenticated seals every carrier packet");
        return driver;
    }
    let path = ringlb_fastpath::FastPath::load(&ringlb_fastpath::FastPathConfig {
        interface: config.node.underlay_interface.clone(),
        vip,
        local,
        carrier_port: config.carrier.port,
        mark: fp.mark,
        rule_pref: fp.rule_pref,
        max_flows: fp.max_flows,
    });
    match path {
        Ok(path) => {
            tracing::info!(
                interface = %config.node.underlay_interface,
                max_flows = fp.max_flows,
                "fast path on: established flows are carried by the kernel (tc eBPF)"
            );
            driver.with_fast_path(
                ringlb_dataplane::Offload::new(path, local, config.node.underlay_interface.clone()),
                fp.max_flows as usize,
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "fast path off: the TUN path carries everything");
            driver
        }
    }
}

async fn run_node(config: Config, source: ConfigSource) -> anyhow::Result<()> {
    // SIGHUP's default action ends the process: it is taken over before anything else, so a
    // reload sent while the daemon starts is kept for later rather than fatal.
    let side = SideThread::start()?;
    let hup = {
        let _on_side = side.runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?
    };
    let local = config.local_member().context("node.name is not among members")?;
    let mut me = Member::new(&local.name, local.addr, local.weight);
    me.site.clone_from(&config.node.site);
    let mut members = vec![me];
    members
        .extend(config.members.iter().filter(|m| m.name != local.name).map(|m| Member::new(&m.name, m.addr, m.weight)));
    let members = Members::new(members)?;
    let local_id = members.by_name(&local.name).context("node.name is not among members")?;
    let steering = config.steering();
    let (tun, tun_mtu) = match &config.tun.owner {
        None => {
            let tun_mtu = config.tun_mtu().map_err(anyhow::Error::msg)?;
            let tun = ringlb_dataplane::tun::open(&config.tun.name, tun_mtu, config.node.vip, steering.table)
                .context("creating the TUN device (are you root, and did `ringlb setup` run?)")?;
            (tun, tun_mtu)
        }
        Some(owner) => {
            let tun = ringlb_dataplane::tun::attach(&config.tun.name).with_context(|| {
                format!(
                    "attaching to the TUN device {} that `ringlb setup` made for tun.owner = {owner:?} (does this \
                     process run as that user, and may it open /dev/net/tun?)",
                    config.tun.name
                )
            })?;
            (tun, underlay_mtu(&config.tun.name)?)
        }
    };
    let carrier = Carrier::open(config.carrier.kind, local.addr, config.carrier.port, config.carrier.source_ports)
        .with_context(|| format!("opening the {:?} carrier on {}", config.carrier.kind, local.addr))?;
    let node = Node::new(
        NodeConfig {
            local: local_id,
            vip: config.node.vip,
            tun_mtu,
            flows: config.flow_config(),
            policy: config.policy(),
            seed: config.placement.seed.unwrap_or_else(random_seed),
            on_failure: match config.failure.tcp {
                TcpOnFailure::Reset => ringlb_core::FailurePolicy::Reset,
                TcpOnFailure::Replace => ringlb_core::FailurePolicy::Replace,
            },
            load_stale_after: config.failure.load_stale_after,
            require_load: config.control.is_some(),
            // Claims travel over the control plane: without one nobody claims, so nobody waits.
            recovery: if config.control.is_some() {
                ringlb_core::RecoveryConfig::default()
            } else {
                ringlb_core::RecoveryConfig {
                    settle: Duration::ZERO,
                    query_grace: Duration::ZERO,
                    ..ringlb_core::RecoveryConfig::default()
                }
            },
        },
        members,
    );
    let sealing = ringlb_dataplane::Sealing {
        require: config.carrier.require_authenticated,
        between_sites: config.carrier.seal_between_sites,
        config: ringlb_core::seal::SealConfig {
            key_lifetime: config.carrier.key_lifetime,
            // A replaced key is kept for late packets, never longer than keys live.
            overlap: config.carrier.key_lifetime.min(Duration::from_secs(10)),
            ..ringlb_core::seal::SealConfig::default()
        },
    };
    let mut node = node;
    node.set_site_policy(config.site_policy());
    node.set_site_weights(config.sites.weights.iter().map(|(s, w)| (s.clone(), *w)).collect());
    let (driver, mut handle) = Driver::new(node, tun, carrier, sealing);
    let driver = start_fast_path(&config, local.addr, driver);
    let (stop_tx, stop_rx) = watch::channel(false);
    // The control plane (QUIC, TLS, membership) and the admin endpoint run on a thread of their
    // own, so that a flood of packets cannot delay probes (and get a live peer declared dead),
    // and TLS work or a status request cannot delay packets. This thread keeps the data plane.
    let control = {
        let _on_side = side.runtime.enter();
        match &config.control {
            Some(c) => Some(start_control(c, &local, &config.node.site, &mut handle, stop_rx.clone())?),
            None => None,
        }
    };
    let listener = {
        let _on_side = side.runtime.enter();
        let std = std::net::TcpListener::bind(config.admin.listen)
            .with_context(|| format!("binding admin.listen = {}", config.admin.listen))?;
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)?
    };
    let control_handle = control.as_ref().map(|(h, _)| h.clone());
    let health_status = health::HealthStatus::default();
    let health_task = (config.health.check != config::HealthKind::None).then(|| {
        let _on_side = side.runtime.enter();
        health::spawn(
            config.health.clone(),
            config.node.vip,
            control_handle.clone(),
            handle.updates.clone(),
            health_status.clone(),
        )
    });
    let edge_status = edge::EdgeStatus::default();
    if let Some(mechanism) = config.entry_mechanism() {
        let IpAddr::V4(vip) = config.node.vip else { anyhow::bail!("node.vip: only IPv4 VIPs are supported so far") };
        let _on_side = side.runtime.enter();
        edge::spawn(
            edge::EdgeConfig {
                mechanism,
                node: local.name.clone(),
                vip,
                underlay: config.node.underlay_interface.clone(),
                tun: config.tun.name.clone(),
                table: config.entry.table,
                takeover_after: config.entry.takeover_after,
            },
            handle.snapshots.clone(),
            control_handle.clone(),
            health_status.clone(),
            edge_status.clone(),
        )?;
    }
    let loaded_cert: admin::LoadedCert = std::sync::Arc::new(std::sync::Mutex::new(
        config
            .control
            .as_ref()
            .and_then(|c| ringlb_control::certs::read_info(&c.cert).ok().map(|i| (c.cert.clone(), i))),
    ));
    let reloader = std::sync::Arc::new(tokio::sync::Mutex::new(reload::Reloader {
        loaded_cert: loaded_cert.clone(),
        path: source.file,
        overrides: source.overrides,
        set_log_level: source.set_log_level,
        current: config.clone(),
        control: control_handle.clone(),
        updates: handle.updates.clone(),
        health: health_status.clone(),
        health_task,
        vip: config.node.vip,
    }));
    side.runtime.spawn(reload::on_sighup(hup, reloader.clone()));
    let admin = admin::Admin {
        cert: loaded_cert,
        snapshots: handle.snapshots.clone(),
        control: control_handle,
        edge: edge_status,
        health: health_status,
        reloader,
        node: local.name.clone(),
    };
    let socket = {
        let _on_side = side.runtime.enter();
        admin::bind_socket(&config.admin.socket)
            .with_context(|| format!("binding admin.socket = {:?}", config.admin.socket.display().to_string()))?
    };
    side.runtime.spawn(admin::serve_socket(socket, admin.clone()));
    side.runtime.spawn(admin::serve_http(listener, admin));
    tracing::info!(
        node = %local.name, vip = %config.node.vip, carrier = ?config.carrier.kind, tun_mtu,
        control = config.control.is_some(), admin = %config.admin.listen,
        entry = config.entry_mechanism().map_or("none", ringlb_core::entry::Mechanism::name), "ringlb node running"
    );
    let mut stop = stop_rx.clone();
    let stopping = handle.stop;
    let drain = Drain {
        control: control.as_ref().map(|(h, _)| h.clone()),
        timeout: config.node.stop_timeout,
        // Peers learn of the drain from this node's next load vector; two of them, and SYNs a
        // peer placed here just before, arrive before the node may leave.
        settle: config.control.as_ref().map_or(Duration::ZERO, |c| 2 * c.load_interval),
    };
    let dataplane = driver.run(async move {
        let mut signals = StopSignals::new();
        signals.recv().await;
        drain.run(stopping, &mut signals).await;
        let _ = stop_tx.send(true);
    });
    tokio::pin!(dataplane);
    tokio::select! {
        r = &mut dataplane => r?,
        _ = stop.changed() => {}
    }
    // The control plane announces the departure before the process exits.
    if let Some((_, task)) = control {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    drop(side);
    tracing::info!("ringlb node stopped");
    Ok(())
}

/// A second single-threaded runtime on its own OS thread, for everything but the data plane.
struct SideThread {
    runtime: tokio::runtime::Handle,
    /// Dropping it ends the thread's `block_on`, and with it the runtime and its tasks.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SideThread {
    fn start() -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let runtime = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ringlb-control".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
            })
            .context("starting the control-plane thread")?;
        Ok(SideThread { runtime, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for SideThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the QUIC control plane, which reads this node's load straight from the data plane,
/// and the bridge that applies its members, loads and drain to the core.
fn start_control(
    c: &config::ControlSection,
    local: &config::MemberEntry,
    site: &str,
    handle: &mut ringlb_dataplane::DriverHandle,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(ControlHandle, tokio::task::JoinHandle<()>)> {
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(1);
    // Weights are small numbers that the load vector carries as f32.
    #[allow(clippy::cast_possible_truncation)]
    let weight = local.weight as f32;
    let cluster = c.cluster_config();
    let limits = ringlb_control::Limits {
        max_handshakes: c.max_handshakes,
        retry_above: (c.max_handshakes / 4).max(1),
        ..ringlb_control::Limits::default()
    };
    let control_config = ControlConfig {
        identity: Identity {
            name: local.name.clone(),
            underlay: local.addr,
            control: c.listen,
            weight,
            flow_hash: ringlb_core::cluster::flow_hash_fingerprint(),
            site: site.to_owned(),
        },
        listen: c.listen,
        seeds: c.seeds.iter().filter_map(|s| config::parse_seed(s)).collect(),
        tls: ringlb_control::tls::TlsFiles { ca: c.ca.clone(), cert: c.cert.clone(), key: c.key.clone() },
        cluster,
        limits,
        load_interval: c.load_interval,
        incarnation,
    };
    let (events_tx, mut events_rx) = mpsc::channel::<ControlEvent>(1024);
    let (control, task) = ringlb_control::driver::spawn(control_config, events_tx, handle.load.clone(), stop)
        .context("starting the control plane")?;
    let updates = handle.updates.clone();
    tokio::spawn(async move {
        while let Some(ev) = events_rx.recv().await {
            let update = match ev {
                ControlEvent::Cluster(u) => NodeUpdate::Cluster(u),
                ControlEvent::Drain(on) => NodeUpdate::Drain(on),
                ControlEvent::CarrierKey { name, direction, secret } => {
                    NodeUpdate::CarrierKey { name, direction, secret }
                }
                ControlEvent::Rtt { name, rtt } => NodeUpdate::Rtt { name, rtt },
            };
            if updates.send(update).await.is_err() {
                return;
            }
        }
    });
    // Flow recovery: the core's messages to their members.
    let (_, empty) = mpsc::channel(1);
    let mut flow_messages = std::mem::replace(&mut handle.flow_messages, empty);
    let sender = control.clone();
    tokio::spawn(async move {
        while let Some(msgs) = flow_messages.recv().await {
            if !sender.send_flows(msgs).await {
                return;
            }
        }
    });
    Ok((control, task))
}

/// SIGTERM and SIGINT (Ctrl-C): the first starts a graceful stop, a second ends it at once.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals { term: signal(SignalKind::terminate()).ok(), int: signal(SignalKind::interrupt()).ok() }
    }

    async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            // Without a handler (or once its driver is gone) this one never fires.
            if let Some(s) = s {
                if s.recv().await.is_some() {
                    return;
                }
            }
            std::future::pending().await
        }
        tokio::select! {
            () = one(&mut self.term) => {}
            () = one(&mut self.int) => {}
        }
    }
}

/// How a stopping node drains before it leaves.
struct Drain {
    control: Option<ControlHandle>,
    /// `node.stop_timeout`: the longest it waits.
    timeout: Duration,
    /// The shortest it waits, so that peers learn of the drain before it leaves.
    settle: Duration,
}

impl Drain {
    /// Stops taking new flows (peers see `draining`; new flows entering here are served here)
    /// and waits until no live flow needs this daemon, the timeout passes, or a second signal
    /// comes. The control plane announces the departure afterwards.
    async fn run(self, mut stop: ringlb_dataplane::Stop, signals: &mut StopSignals) {
        if self.timeout.is_zero() {
            tracing::info!("stopping at once: node.stop_timeout is 0");
            return;
        }
        let start = tokio::time::Instant::now();
        let settle = self.settle.min(self.timeout);
        let deadline = start + self.timeout;
        tracing::info!(
            stop_timeout = ?self.timeout,
            "stopping: no new flows from peers; waiting for the flows that need this daemon \
             (a second SIGTERM or Ctrl-C stops at once)"
        );
        stop.begin();
        if let Some(c) = &self.control {
            c.drain(true).await;
        }
        // Without a control plane, peers cannot learn that this node leaves, and they keep
        // forwarding to it before and after a restart (which then serves them again): waiting
        // for those flows would only run into the deadline.
        let waits_for_served = self.control.is_some();
        let mut last_log: Option<tokio::time::Instant> = None;
        let mut remaining: Option<usize> = None;
        let shown = |r: Option<usize>| r.map_or_else(|| "not counted yet".to_owned(), |n| n.to_string());
        loop {
            tokio::select! {
                count = stop.next_count() => {
                    let Some(count) = count else { return };
                    let left = count.forwarded + if waits_for_served { count.served } else { 0 };
                    remaining = Some(left);
                    let now = tokio::time::Instant::now();
                    if left == 0 && now >= start + settle {
                        tracing::info!(waited = ?now - start, "stopping: no flow needs this daemon any more");
                        return;
                    }
                    if last_log.is_none_or(|t| now - t >= Duration::from_secs(1)) {
                        last_log = Some(now);
                        tracing::info!(
                            flows = left, forwarded = count.forwarded, served = count.served,
                            deadline_in = ?deadline.saturating_duration_since(now),
                            "stopping: flows still need this daemon"
                        );
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        flows = %shown(remaining), stop_timeout = ?self.timeout,
                        "stopping: node.stop_timeout passed; leaving with flows that still need this daemon"
                    );
                    return;
                }
                () = signals.recv() => {
                    tracing::warn!(flows = %shown(remaining), "stopping at once: second signal");
                    return;
                }
            }
        }
    }
}
