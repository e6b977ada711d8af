//! The `ringlb` binary: CLI, configuration, and wiring of core, data plane and admin endpoint.

mod admin;
mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ringlb_core::{Member, Members, Node, NodeConfig};
use ringlb_dataplane::{Carrier, Driver};

use config::{CarrierOverrides, Config, NodeOverrides, Overrides};

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
    #[command(subcommand)]
    command: Command,
}

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
    /// Print the running node's member table and counters.
    Status,
    /// Print the running node's Prometheus metrics.
    Metrics,
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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = match config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(cli.command, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Check => {
            println!("{config:#?}");
            Ok(())
        }
        Command::Setup => {
            config.check_host().map_err(anyhow::Error::msg)?;
            Ok(config.steering().setup()?)
        }
        Command::Teardown => Ok(config.steering().teardown()?),
        Command::Status | Command::Metrics => {
            let path = if matches!(command, Command::Status) { "/status" } else { "/metrics" };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let body = rt
                .block_on(admin::fetch(config.admin.listen, path))
                .with_context(|| format!("no node answering on admin.listen = {}", config.admin.listen))?;
            print!("{body}");
            Ok(())
        }
        Command::Node => {
            config.check_host().map_err(anyhow::Error::msg)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run_node(config))
        }
    }
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

async fn run_node(config: Config) -> anyhow::Result<()> {
    let local = config.local_member().context("node.name is not among members")?.clone();
    let members = Members::new(config.members.iter().map(|m| Member::new(&m.name, m.addr, m.weight)))?;
    let local_id = members.by_name(&local.name).context("node.name is not among members")?;
    let tun_mtu = match config.tun.mtu {
        Some(m) => m,
        None => underlay_mtu(&config.node.underlay_interface)?.saturating_sub(config.carrier.kind.overhead()),
    };
    let steering = config.steering();
    let tun = ringlb_dataplane::tun::open(&config.tun.name, tun_mtu, config.node.vip, steering.table)
        .context("creating the TUN device (are you root, and did `ringlb setup` run?)")?;
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
            on_failure: ringlb_core::FailurePolicy::Reset,
            load_stale_after: std::time::Duration::from_secs(1),
        },
        members,
    );
    let (driver, snapshot) = Driver::new(node, tun, carrier);
    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("binding admin.listen = {}", config.admin.listen))?;
    tokio::spawn(admin::serve(listener, snapshot, local.name.clone()));
    tracing::info!(
        node = %local.name, vip = %config.node.vip, carrier = ?config.carrier.kind, tun_mtu,
        members = config.members.len(), admin = %config.admin.listen, "ringlb node running"
    );
    driver.run(shutdown_signal()).await?;
    tracing::info!("ringlb node stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
