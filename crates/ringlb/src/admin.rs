//! The operator surface, on two listeners:
//!
//! - `admin.listen` (TCP, default 127.0.0.1:9090): read-only HTTP/1.0, `GET /metrics`
//!   (Prometheus text) and `GET /status` (a table for people). Nothing here changes anything.
//! - `admin.socket` (a Unix socket, mode 0660, default `/run/ringlb/admin.sock`): one command
//!   per connection, `status`, `status-json`, `metrics`, `drain`, `undrain`, `reload`; the
//!   answer's first line is `ok` or `error`. Only who may open the socket may act: no network
//!   path reaches it. The CLI's `ringlb status|metrics|drain|undrain|reload` speak this.
//!
//! Both read the snapshot the packet loop hands out on request, never the live core.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use ringlb_control::ControlHandle;
use ringlb_core::{DropReason, MemberState, Refusal};
use ringlb_dataplane::{Snapshot, SnapshotRequests};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::edge::{EdgeStatus, EdgeView};
use crate::health::{HealthStatus, HealthView};
use crate::reload::Reloader;

/// What the side thread's tasks (edge, health checks) last published.
#[derive(Debug, Clone, Copy)]
struct Side<'a> {
    edge: Option<&'a EdgeView>,
    health: Option<&'a HealthView>,
}

/// Everything the admin listeners read from or act on; cheap to clone.
#[derive(Clone)]
pub struct Admin {
    /// The certificate this node presents (`control.cert` as loaded), for its expiry.
    pub cert: LoadedCert,
    pub snapshots: SnapshotRequests,
    pub control: Option<ControlHandle>,
    pub edge: EdgeStatus,
    pub health: HealthStatus,
    pub reloader: Arc<tokio::sync::Mutex<Reloader>>,
    pub node: String,
}

/// Requests answered at once per listener; more wait in the kernel's backlog. A flood of
/// scrapes must not starve the edge's own snapshots or exhaust file descriptors.
const MAX_REQUESTS: usize = 16;
/// A request must arrive within this long.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The read-only HTTP listener.
pub async fn serve_http(listener: TcpListener, admin: Admin) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(e) = answer_http(stream, &admin).await {
                tracing::debug!(%peer, error = %e, "admin request failed");
            }
            drop(permit);
        });
    }
}

async fn answer_http(mut stream: TcpStream, admin: &Admin) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let request = String::from_utf8_lossy(&buf[..n]);
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
    let (status, body) = match (method, path) {
        ("GET", "/metrics" | "/status") => match admin.text(&path[1..]).await {
            Some(body) => ("200 OK", body),
            None => ("503 Service Unavailable", "the packet loop has stopped\n".to_owned()),
        },
        ("GET", _) => ("404 Not Found", "try /metrics or /status; actions are on admin.socket\n".to_owned()),
        _ => ("405 Method Not Allowed", "read-only: GET /metrics or /status\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the action socket at `path`, mode 0660. A stale socket (nobody listening: a daemon
/// that died) is replaced; a live one is another daemon's, and is left alone.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another running daemon answers on it (give each node its own admin.socket)",
                ));
            }
            std::fs::remove_file(path)?;
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// The action socket.
pub async fn serve_socket(listener: UnixListener, admin: Admin) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "admin socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(e) = answer_socket(stream, &admin).await {
                tracing::debug!(error = %e, "admin socket request failed");
            }
            drop(permit);
        });
    }
}

async fn answer_socket(mut stream: UnixStream, admin: &Admin) -> std::io::Result<()> {
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf)).await.unwrap_or(Ok(0))?;
    let command = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
    let result = admin.command(&command).await;
    let reply = match result {
        Ok(body) => format!("ok\n{body}"),
        Err(body) => format!("error\n{body}"),
    };
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

impl Admin {
    async fn text(&self, what: &str) -> Option<String> {
        let snapshot = self.snapshots.get().await?;
        let (edge, health) = (self.edge.get(), self.health.get());
        let side = Side { edge: edge.as_ref(), health: health.as_ref() };
        let control = self.control.as_ref();
        Some(match what {
            "metrics" => {
                metrics(&snapshot, control, &self.node)
                    + &health_metrics(side.health, &self.node)
                    + &edge_metrics(side.edge, &self.node)
                    + &cert_metrics(&self.cert, &self.node)
            }
            "status-json" => {
                serde_json::to_string_pretty(&status_json(&snapshot, control, side, &self.node)).unwrap_or_default()
                    + "\n"
            }
            _ => {
                status(&snapshot, control, &self.node)
                    + &health_status(side.health)
                    + &edge_status(side.edge)
                    + &cert_status(&self.cert)
            }
        })
    }

    /// One command from the action socket: its answer, or an error the CLI exits non-zero on.
    async fn command(&self, command: &str) -> Result<String, String> {
        let node = &self.node;
        match command {
            "status" | "status-json" | "metrics" => {
                self.text(command).await.ok_or_else(|| "the packet loop has stopped".to_owned())
            }
            "drain" | "undrain" => {
                let on = command == "drain";
                // A stopping node drains until it exits: taking new flows again would only make
                // it wait for them, and leave them to be reset at its deadline.
                let stopping = !on && self.snapshots.get().await.is_some_and(|s| s.stopping.is_some());
                match &self.control {
                    _ if stopping => Err(format!("{node}: stopping; it drains until it exits\n")),
                    Some(c) if c.drain(on).await => {
                        Ok(format!("{node}: {}\n", if on { "draining: no new flows" } else { "taking new flows" }))
                    }
                    _ => Err("drain needs the control plane ([control] in the config)\n".to_owned()),
                }
            }
            "reload" => match self.reloader.lock().await.reload().await {
                Ok(changes) if changes.is_empty() => Ok(format!("{node}: reloaded, nothing changed\n")),
                Ok(changes) => Ok(format!("{node}: reloaded: {}\n", changes.join("; "))),
                Err(e) => Err(format!("{node}: reload refused, nothing changed: {e}\n")),
            },
            other => Err(format!("unknown command {other:?}: status, status-json, metrics, drain, undrain, reload\n")),
        }
    }
}

/// Sends `command` to the action socket at `path`; Ok(answer) or Err(the daemon's error).
pub async fn call(path: &Path, command: &str) -> anyhow::Result<Result<String, String>> {
    use anyhow::Context as _;
    let mut stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("no node answering on admin.socket = {:?}", path.display().to_string()))?;
    stream.write_all(command.as_bytes()).await?;
    stream.shutdown().await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    match reply.split_once('\n') {
        Some(("ok", body)) => Ok(Ok(body.to_owned())),
        Some(("error", body)) => Ok(Err(body.to_owned())),
        _ => anyhow::bail!("admin.socket answered {reply:?}"),
    }
}

/// `ringlb status --json`.
fn status_json(s: &Snapshot, control: Option<&ControlHandle>, side: Side<'_>, node: &str) -> serde_json::Value {
    use serde_json::json;
    let views = control.map(ControlHandle::members).unwrap_or_default();
    let members: Vec<serde_json::Value> = s
        .members
        .iter()
        .map(|m| {
            let v = views.iter().find(|v| v.name == m.name);
            let load = v.and_then(|v| v.load);
            json!({
                "name": m.name,
                "site": m.site,
                "placed_flows": m.placed_flows,
                "address": m.addr.to_string(),
                "local": m.is_local,
                "state": m.state.name(),
                "app_healthy": !load.is_some_and(|l| l.app_unhealthy),
                "weight": m.weight,
                "rtt_ms": v.and_then(|v| v.rtt).map(|r| r.as_secs_f64() * 1e3),
                "serves": load.map(|l| l.served_flows),
                "cpu": load.map(|l| l.cpu),
                "load_age_ms": v.and_then(|v| v.load_age).map(|a| a.as_millis()),
                "flows_pinned": m.flows,
                "forwarded_packets": m.forwarded_packets,
            })
        })
        .collect();
    let c = &s.counters;
    let drops: serde_json::Map<String, serde_json::Value> =
        DropReason::ALL.iter().map(|r| (r.name().to_owned(), json!(c.drops(*r)))).collect();
    json!({
        "node": node,
        "flows": s.flows,
        "flows_unconfirmed": s.flows_unconfirmed,
        "draining": control.is_some_and(ControlHandle::draining),
        "stopping": s.stopping.map(|r| json!({"forwarded": r.forwarded, "served": r.served})),
        "dataplane_stalled": control.is_some_and(ControlHandle::dataplane_stalled),
        "members": members,
        "packets": {
            "delivered_local": c.delivered_local,
            "forwarded": c.forwarded,
            "decapsulated": c.decapsulated,
        },
        "drops": drops,
        "kernel_drops": {
            "tun_queue": s.kernel_drops.tun_queue,
            "carrier_socket": s.kernel_drops.carrier_socket,
        },
        "recovery": {
            "flows_recovered": c.flows_recovered,
            "flows_unrecovered": c.flows_unrecovered,
            "second_hop_packets": c.second_hop_packets,
            "unclaimed_delivered": c.unclaimed_delivered,
            "queries_sent": c.queries_sent,
            "queries_answered": c.queries_answered,
            "directory_claims": s.directory,
            "claims_accepted": c.claims_accepted,
            "claims_refused_quota": c.claims_refused_quota,
            "claims_refused_conflict": c.claims_refused_conflict,
            "claims_refused_invalid": c.claims_refused_invalid,
            "teach_refused": c.teach_refused,
        },
        "sealed_carrier": {
            "peers_with_keys": s.seal_peers,
            "sealed_packets": s.seal.sealed,
            "opened_packets": s.seal.opened,
            "key_rotations": s.seal.rotations,
            "sessions": s.seal.sessions,
        },
        "fast_path": s.fast_path.map(|f| json!({
            "flows": f.core.flows,
            "flows_installed": f.core.installed,
            "flows_withdrawn": f.core.withdrawn,
            "flows_refused_full": f.core.refused_full + f.install_errors,
            "local_packets": f.program.local,
            "forwarded_packets": f.program.encapsulated,
            "decapsulated_packets": f.program.decapsulated,
            "passed_control": f.program.passed_control,
            "passed_mtu": f.program.passed_mtu,
            "passed_gso": f.program.passed_gso,
            "passed_source": f.program.passed_source,
            "errors": f.program.errors,
        })),
        "health": side.health.map(|h| json!({
            "state": h.state.name(),
            "target": h.target.to_string(),
            "for_seconds": h.since.elapsed().as_secs_f64(),
            "checks_ok": h.checks_ok,
            "checks_failed": h.checks_failed,
            "last_error": h.last_error,
        })),
        "entry": side.edge.map(|e| json!({
            "mechanism": e.mechanism.name(),
            "announced": e.announced,
            "for_seconds": e.since.elapsed().as_secs_f64(),
            "withheld": e.withheld.map(|w| w.name()),
            "changes": e.changes,
            "owners": e.owners,
        })),
    })
}

/// Prometheus text exposition.
pub fn metrics(s: &Snapshot, control: Option<&ControlHandle>, node: &str) -> String {
    let c = &s.counters;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP ringlb_{name} {help}\n# TYPE ringlb_{name} counter\nringlb_{name}{{node=\"{node}\"}} {value}"
        );
    };
    counter("delivered_local_packets_total", "Packets from the TUN delivered to the local kernel.", c.delivered_local);
    counter("forwarded_packets_total", "Packets from the TUN sent to a peer.", c.forwarded);
    counter("decapsulated_packets_total", "Carrier packets accepted and delivered locally.", c.decapsulated);
    counter("mss_clamped_total", "Forwarded SYNs whose MSS was lowered.", c.mss_clamped);
    counter("flows_created_total", "Flows created.", c.flows_created);
    counter("flows_expired_total", "Flows expired after idling.", c.flows_expired);
    counter(
        "flows_evicted_total",
        "Unconfirmed flows placed by hash, evicted to make room while the flow table was under pressure.",
        c.flows_evicted,
    );
    counter(
        "flows_untracked_total",
        "Packets of unknown flows placed by consistent hash without being tracked (flow table under pressure, or an unknown FIN/RST).",
        c.flows_untracked,
    );
    counter("flows_reset_total", "TCP flows of a dead member handed to the local kernel to be reset.", c.flows_reset);
    counter("flows_replaced_total", "Flows of a dead member placed anew.", c.flows_replaced);
    counter(
        "flows_recovered_total",
        "Connections this entry did not know and found the server of (taught by their home, or from its own directory).",
        c.flows_recovered,
    );
    counter(
        "flows_unrecovered_total",
        "Connections this entry did not know and nobody claimed: handed to the local kernel (a RST unless it holds them).",
        c.flows_unrecovered,
    );
    counter(
        "second_hop_packets_total",
        "Packets this node, as their flow's home, passed on to the flow's server for an entry that did not know it.",
        c.second_hop_packets,
    );
    counter(
        "flow_queries_sent_total",
        "Batches of connections this node, as their home without a claim, asked every member about.",
        c.queries_sent,
    );
    counter(
        "flow_queries_answered_total",
        "Members' questions about connections this node answered.",
        c.queries_answered,
    );
    counter(
        "unclaimed_delivered_packets_total",
        "Packets of connections this node does not serve, sent by an entry, that nobody claims: delivered (the kernel answers RST).",
        c.unclaimed_delivered,
    );
    counter(
        "carrier_sealed_packets_total",
        "Carrier packets this node sealed (AES-256-GCM) before sending.",
        s.seal.sealed,
    );
    counter(
        "carrier_opened_packets_total",
        "Sealed carrier packets this node received that authenticated (refusals are in dropped_packets_total).",
        s.seal.opened,
    );
    counter("carrier_key_rotations_total", "Carrier key epochs this node moved to as a sender.", s.seal.rotations);
    counter(
        "carrier_sessions_total",
        "Sealed-carrier secrets installed, one per QUIC session and direction.",
        s.seal.sessions,
    );
    if let Some(f) = &s.fast_path {
        counter("fast_path_flows_installed_total", "Flows handed to the kernel fast path.", f.core.installed);
        counter(
            "fast_path_flows_withdrawn_total",
            "Flows taken back from the fast path (closing, expired, moved, or their member no longer eligible).",
            f.core.withdrawn,
        );
        counter(
            "fast_path_flows_refused_total",
            "Flows left on the TUN path because the fast path's table was full or refused them.",
            f.core.refused_full + f.install_errors,
        );
        counter("fast_path_errors_total", "Packets on which a fast-path helper failed.", f.program.errors);
    }
    counter(
        "teach_refused_total",
        "Answers naming a flow's server refused (from a node not asked, or naming no live member).",
        c.teach_refused,
    );
    let _ = writeln!(
        out,
        "# HELP ringlb_flow_claims_total Servers' claims on flows homed at this node, by result.
# TYPE ringlb_flow_claims_total counter"
    );
    for (result, v) in [
        ("accepted", c.claims_accepted),
        ("quota", c.claims_refused_quota),
        ("conflict", c.claims_refused_conflict),
        ("invalid", c.claims_refused_invalid),
    ] {
        let _ = writeln!(out, "ringlb_flow_claims_total{{node=\"{node}\",result=\"{result}\"}} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_fast_path_enabled Whether the kernel fast path runs (1) or the TUN path carries everything (0).\n\
         # TYPE ringlb_fast_path_enabled gauge\nringlb_fast_path_enabled{{node=\"{node}\"}} {}",
        u8::from(s.fast_path.is_some())
    );
    if let Some(f) = &s.fast_path {
        let _ = writeln!(
            out,
            "# HELP ringlb_fast_path_flows Flows the kernel fast path carries now.\n\
             # TYPE ringlb_fast_path_flows gauge\nringlb_fast_path_flows{{node=\"{node}\"}} {}",
            f.core.flows
        );
        let _ = writeln!(
            out,
            "# HELP ringlb_fast_path_packets_total Packets the kernel fast path carried without the daemon, by what it did.\n\
             # TYPE ringlb_fast_path_packets_total counter"
        );
        for (action, v) in [
            ("local", f.program.local),
            ("forwarded", f.program.encapsulated),
            ("decapsulated", f.program.decapsulated),
        ] {
            let _ = writeln!(out, "ringlb_fast_path_packets_total{{node=\"{node}\",action=\"{action}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP ringlb_fast_path_passed_packets_total Packets of offloaded flows the fast path left to the daemon, by why.\n\
             # TYPE ringlb_fast_path_passed_packets_total counter"
        );
        for (reason, v) in [
            ("syn", f.program.passed_control),
            ("mtu", f.program.passed_mtu),
            ("gso", f.program.passed_gso),
            ("wrong_source", f.program.passed_source),
        ] {
            let _ = writeln!(out, "ringlb_fast_path_passed_packets_total{{node=\"{node}\",reason=\"{reason}\"}} {v}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_flow_directory_claims Claims held by this node as the home of their flows.\n\
         # TYPE ringlb_flow_directory_claims gauge\nringlb_flow_directory_claims{{node=\"{node}\"}} {}",
        s.directory
    );
    let _ = writeln!(
        out,
        "# HELP ringlb_placements_total New flows placed, by outcome.\n# TYPE ringlb_placements_total counter"
    );
    for (outcome, v) in [
        ("local", c.placed_local),
        ("peer", c.placed_peer),
        ("hash_fallback", c.placed_by_hash_fallback),
        ("hash_pressure", c.placed_by_hash_under_pressure),
        ("doubtful_peer", c.placed_on_doubtful),
    ] {
        let _ = writeln!(out, "ringlb_placements_total{{node=\"{node}\",outcome=\"{outcome}\"}} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_dropped_packets_total Packets dropped, by reason.\n# TYPE ringlb_dropped_packets_total counter"
    );
    for r in DropReason::ALL {
        let _ = writeln!(out, "ringlb_dropped_packets_total{{node=\"{node}\",reason=\"{}\"}} {}", r.name(), c.drops(r));
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_kernel_dropped_packets_total Packets the kernel dropped before this daemon read them \
         (overload): VIP packets the TUN's queue had no room for, carrier packets the carrier socket's receive \
         buffer had no room for. A dropped GSO or GRO batch counts once. Absent when unreadable.\n\
         # TYPE ringlb_kernel_dropped_packets_total counter"
    );
    for (place, v) in [("tun_queue", s.kernel_drops.tun_queue), ("carrier_socket", s.kernel_drops.carrier_socket)] {
        if let Some(v) = v {
            let _ = writeln!(out, "ringlb_kernel_dropped_packets_total{{node=\"{node}\",where=\"{place}\"}} {v}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_flows Flows tracked.\n# TYPE ringlb_flows gauge\nringlb_flows{{node=\"{node}\"}} {}",
        s.flows
    );
    let _ = writeln!(
        out,
        "# HELP ringlb_flows_unconfirmed Flows tracked that no later packet has confirmed yet (at most flows.unconfirmed_share of flows.max).\n\
         # TYPE ringlb_flows_unconfirmed gauge\nringlb_flows_unconfirmed{{node=\"{node}\"}} {}",
        s.flows_unconfirmed
    );
    let _ = writeln!(
        out,
        "# HELP ringlb_stopping Whether the daemon is stopping (draining before it exits).\n\
         # TYPE ringlb_stopping gauge\nringlb_stopping{{node=\"{node}\"}} {}",
        u8::from(s.stopping.is_some())
    );
    if let Some(r) = s.stopping {
        let _ = writeln!(
            out,
            "# HELP ringlb_stopping_flows Live flows the stopping daemon waits for: forwarded to peers, \
             or served here for other entries.\n# TYPE ringlb_stopping_flows gauge"
        );
        for (kind, v) in [("forwarded", r.forwarded), ("served", r.served)] {
            let _ = writeln!(out, "ringlb_stopping_flows{{node=\"{node}\",kind=\"{kind}\"}} {v}");
        }
    }
    let _ = writeln!(out, "# HELP ringlb_peer_flows Flows pinned to each member.\n# TYPE ringlb_peer_flows gauge");
    for m in &s.members {
        let _ = writeln!(out, "ringlb_peer_flows{{node=\"{node}\",peer=\"{}\"}} {}", m.name, m.flows);
    }
    let _ = writeln!(out, "# HELP ringlb_peer_forwarded_packets_total Packets forwarded to each peer, by the daemon or the kernel fast path.\n# TYPE ringlb_peer_forwarded_packets_total counter");
    for m in s.members.iter().filter(|m| !m.is_local) {
        let _ = writeln!(
            out,
            "ringlb_peer_forwarded_packets_total{{node=\"{node}\",peer=\"{}\"}} {}",
            m.name, m.forwarded_packets
        );
    }
    out.push_str(&site_metrics(s, node));
    let _ = writeln!(
        out,
        "# HELP ringlb_peer_up Whether the member takes new flows (1) or not (0).\n# TYPE ringlb_peer_up gauge"
    );
    for m in &s.members {
        let up = u8::from(m.state == MemberState::Alive);
        let _ = writeln!(out, "ringlb_peer_up{{node=\"{node}\",peer=\"{}\"}} {up}", m.name);
    }
    if let Some(c) = control {
        let stats = c.stats();
        let _ = writeln!(out, "# HELP ringlb_control_refused_total Control peers or messages refused, by reason.\n# TYPE ringlb_control_refused_total counter");
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "ringlb_control_refused_total{{node=\"{node}\",reason=\"{}\"}} {}",
                r.name(),
                stats.refused(r)
            );
        }
        let _ = writeln!(out, "# HELP ringlb_member_transitions_total Times this node saw a peer change to suspect or to dead.\n# TYPE ringlb_member_transitions_total counter");
        for (state, v) in [("suspect", stats.suspected), ("dead", stats.died)] {
            let _ = writeln!(out, "ringlb_member_transitions_total{{node=\"{node}\",state=\"{state}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP ringlb_refutations_total Times this node refuted a suspicion of itself.\n# TYPE ringlb_refutations_total counter\nringlb_refutations_total{{node=\"{node}\"}} {}", stats.refuted);
        let _ = writeln!(out, "# HELP ringlb_local_health Lifeguard local health: 0 is healthy; timeouts are scaled by one more than this.\n# TYPE ringlb_local_health gauge\nringlb_local_health{{node=\"{node}\"}} {}", c.local_health());
        let _ = writeln!(out, "# HELP ringlb_dataplane_stalled Whether the data plane stopped publishing its load (1): the node is not advertised.\n# TYPE ringlb_dataplane_stalled gauge\nringlb_dataplane_stalled{{node=\"{node}\"}} {}", u8::from(c.dataplane_stalled()));
        let members = c.members();
        let disagree = members.iter().filter(|m| !m.flow_hash_agrees).count();
        let _ = writeln!(out, "# HELP ringlb_flow_hash_mismatch Members that compute another flow hash than this node.\n# TYPE ringlb_flow_hash_mismatch gauge\nringlb_flow_hash_mismatch{{node=\"{node}\"}} {disagree}");
        let alive = members.iter().filter(|m| m.state == MemberState::Alive).count();
        let _ = writeln!(out, "# HELP ringlb_members_alive Members seen alive, this node included.\n# TYPE ringlb_members_alive gauge\nringlb_members_alive{{node=\"{node}\"}} {alive}");
        let _ =
            writeln!(out, "# HELP ringlb_members Members by state, this node included.\n# TYPE ringlb_members gauge");
        for state in
            [MemberState::Alive, MemberState::Suspect, MemberState::Draining, MemberState::Left, MemberState::Dead]
        {
            let n = members.iter().filter(|m| m.state == state).count();
            let _ = writeln!(out, "ringlb_members{{node=\"{node}\",state=\"{}\"}} {n}", state.name());
        }
        for m in &members {
            if let Some(age) = m.load_age {
                let _ = writeln!(
                    out,
                    "ringlb_peer_load_age_seconds{{node=\"{node}\",peer=\"{}\"}} {:.3}",
                    m.name,
                    age.as_secs_f64()
                );
            }
            if let Some(rtt) = m.rtt {
                let _ = writeln!(
                    out,
                    "ringlb_peer_rtt_seconds{{node=\"{node}\",peer=\"{}\"}} {:.6}",
                    m.name,
                    rtt.as_secs_f64()
                );
            }
        }
    }
    out
}

/// The member table and the main counters, for `ringlb status`.
/// Per site, what this entry placed and forwarded there (the pair: this node's site, that
/// site).
struct SiteTotals {
    own: String,
    /// (site, new flows placed there, packets forwarded there, members there)
    sites: Vec<(String, u64, u64, usize)>,
}

fn site_totals(s: &Snapshot) -> SiteTotals {
    let own = s.members.iter().find(|m| m.is_local).map_or_else(String::new, |m| m.site.clone());
    let mut sites: Vec<(String, u64, u64, usize)> = Vec::new();
    for m in &s.members {
        let i = match sites.iter().position(|(n, ..)| *n == m.site) {
            Some(i) => i,
            None => {
                sites.push((m.site.clone(), 0, 0, 0));
                sites.len() - 1
            }
        };
        sites[i].1 += m.placed_flows;
        sites[i].2 += if m.is_local { 0 } else { m.forwarded_packets };
        sites[i].3 += 1;
    }
    sites.sort();
    SiteTotals { own, sites }
}

fn site_metrics(s: &Snapshot, node: &str) -> String {
    let t = site_totals(s);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ringlb_site_placed_flows_total New flows this entry placed in each site.\n# TYPE ringlb_site_placed_flows_total counter"
    );
    for (site, placed, ..) in &t.sites {
        let _ = writeln!(
            out,
            "ringlb_site_placed_flows_total{{node=\"{node}\",from_site=\"{}\",to_site=\"{site}\"}} {placed}",
            t.own
        );
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_site_forwarded_packets_total Packets this entry forwarded to each site.\n# TYPE ringlb_site_forwarded_packets_total counter"
    );
    for (site, _, fwd, _) in &t.sites {
        let _ = writeln!(
            out,
            "ringlb_site_forwarded_packets_total{{node=\"{node}\",from_site=\"{}\",to_site=\"{site}\"}} {fwd}",
            t.own
        );
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_site_spilling Whether this entry spills new flows to other sites for load.\n# TYPE ringlb_site_spilling gauge\nringlb_site_spilling{{node=\"{node}\"}} {}",
        u8::from(s.spilling)
    );
    out
}

pub fn status(s: &Snapshot, control: Option<&ControlHandle>, node: &str) -> String {
    let c = &s.counters;
    let mut out = format!("node {node}: {} flows tracked, {} dropped packets", s.flows, c.total_drops());
    if let Some(r) = s.stopping {
        let _ = write!(
            out,
            ", STOPPING: {} flows need this daemon ({} forwarded to peers, {} served for other entries)",
            r.total(),
            r.forwarded,
            r.served
        );
    } else if control.is_some_and(ControlHandle::draining) {
        out.push_str(", DRAINING");
    }
    out.push('\n');
    let views: Vec<_> = control.map(ControlHandle::members).unwrap_or_default();
    let _ = writeln!(
        out,
        "{:<10} {:<15} {:<9} {:>6} {:>8} {:>7} {:>5} {:>8} {:>6} {:>10}",
        "MEMBER", "ADDRESS", "STATE", "WEIGHT", "RTT", "SERVES", "CPU", "LOAD AGE", "FLOWS", "FORWARDED"
    );
    for m in &s.members {
        let name = if m.is_local { format!("{} *", m.name) } else { m.name.clone() };
        let fwd = if m.is_local { "-".to_owned() } else { m.forwarded_packets.to_string() };
        let v = views.iter().find(|v| v.name == m.name);
        let rtt = v.and_then(|v| v.rtt).map_or("-".to_owned(), |r| format!("{:.2}ms", r.as_secs_f64() * 1e3));
        let load = v.and_then(|v| v.load);
        let serves = load.map_or("-".to_owned(), |l| l.served_flows.to_string());
        let cpu = load.map_or("-".to_owned(), |l| format!("{:.0}%", l.cpu * 100.0));
        let age = v.and_then(|v| v.load_age).map_or("-".to_owned(), |a| format!("{}ms", a.as_millis()));
        // A peer whose app fails its checks takes no new flows, like a drained one: say which.
        let state = if load.is_some_and(|l| l.app_unhealthy) { "app-down" } else { m.state.name() };
        let _ = writeln!(
            out,
            "{:<10} {:<15} {:<9} {:>6} {:>8} {:>7} {:>5} {:>8} {:>6} {:>10}",
            name, m.addr, state, m.weight, rtt, serves, cpu, age, m.flows, fwd
        );
    }
    let _ = writeln!(
        out,
        "packets: {} delivered locally, {} forwarded, {} received from peers; flows: {} served here, {} reset after a member died",
        c.delivered_local, c.forwarded, c.decapsulated, c.served_new_flows, c.flows_reset
    );
    let _ = writeln!(
        out,
        "recovery: {} connections recovered, {} unrecovered, {} packets passed on as a home; directory holds {} claims",
        c.flows_recovered, c.flows_unrecovered, c.second_hop_packets, s.directory
    );
    match &s.fast_path {
        Some(f) => {
            let _ = writeln!(
                out,
                "fast path: on, {} flows offloaded ({} handed over, {} taken back); packets: {} delivered locally, {} \
                 forwarded, {} received from peers; left to the daemon: {} SYN, {} too big",
                f.core.flows,
                f.core.installed,
                f.core.withdrawn,
                f.program.local,
                f.program.encapsulated,
                f.program.decapsulated,
                f.program.passed_control,
                f.program.passed_mtu + f.program.passed_gso
            );
        }
        None => {
            let _ = writeln!(out, "fast path: off (the TUN path carries every packet)");
        }
    }
    if s.seal.sessions > 0 {
        let _ = writeln!(
            out,
            "sealed carrier: keys for {} peers; {} packets sealed, {} opened; {} key rotations",
            s.seal_peers, s.seal.sealed, s.seal.opened, s.seal.rotations
        );
    }
    let t = site_totals(s);
    if t.sites.len() > 1 {
        let placed: Vec<String> = t
            .sites
            .iter()
            .map(|(site, placed, _, n)| {
                format!("{site}{} ({n} members) {placed}", if *site == t.own { " [here]" } else { "" })
            })
            .collect();
        let _ = writeln!(
            out,
            "sites: new flows placed: {}; cross-site {}{}",
            placed.join(", "),
            c.placed_cross_site,
            if s.spilling { "; SPILLING for load" } else { "" }
        );
    }
    let _ = writeln!(out, "{}", kernel_drops_line(&s.kernel_drops));
    let drops: Vec<String> =
        DropReason::ALL.iter().filter(|r| c.drops(**r) > 0).map(|r| format!("{}={}", r.name(), c.drops(*r))).collect();
    if !drops.is_empty() {
        let _ = writeln!(out, "drops: {}", drops.join(" "));
    }
    if let Some(c) = control {
        let stats = c.stats();
        let refused: Vec<String> = Refusal::ALL
            .iter()
            .filter(|r| stats.refused(**r) > 0)
            .map(|r| format!("{}={}", r.name(), stats.refused(*r)))
            .collect();
        if !refused.is_empty() {
            let _ = writeln!(out, "control refused: {}", refused.join(" "));
        }
        let odd: Vec<&str> = views.iter().filter(|v| !v.flow_hash_agrees).map(|v| v.name.as_str()).collect();
        if !odd.is_empty() {
            let _ = writeln!(out, "WARNING: flow hash differs on {} (mixed versions?)", odd.join(", "));
        }
        if c.dataplane_stalled() {
            let _ = writeln!(out, "WARNING: the data plane is stalled; this node is not advertised");
        }
    }
    out
}

/// `ringlb status`'s line on what the kernel dropped before the daemon read it.
fn kernel_drops_line(k: &ringlb_dataplane::KernelDrops) -> String {
    let n = |v: Option<u64>| v.map_or("an unknown number of".to_owned(), |v| v.to_string());
    let mut line = format!(
        "overload: the kernel dropped {} packets at the TUN's queue and {} at the carrier socket before this daemon read them",
        n(k.tun_queue),
        n(k.carrier_socket)
    );
    if k.total() > 0 {
        line.push_str(" (more traffic than this daemon keeps up with)");
    }
    line
}

/// The edge's metrics: whether this node announces the VIP, how, and since when.
fn edge_metrics(edge: Option<&EdgeView>, node: &str) -> String {
    let Some(e) = edge else { return String::new() };
    let mut out = String::new();
    let mech = e.mechanism.name();
    let _ = writeln!(
        out,
        "# HELP ringlb_entry_announced Whether this node announces the VIP to the network (entry.mode).\n\
         # TYPE ringlb_entry_announced gauge\nringlb_entry_announced{{node=\"{node}\",mechanism=\"{mech}\"}} {}",
        u8::from(e.announced)
    );
    let _ = writeln!(
        out,
        "# HELP ringlb_entry_state_seconds Seconds since the announcement last changed (or the daemon started).\n\
         # TYPE ringlb_entry_state_seconds gauge\nringlb_entry_state_seconds{{node=\"{node}\",mechanism=\"{mech}\"}} {:.3}",
        e.since.elapsed().as_secs_f64()
    );
    let mut counter = |name: &str, help: &str, labels: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP ringlb_{name} {help}\n# TYPE ringlb_{name} counter\nringlb_{name}{{node=\"{node}\"{labels}}} {value}"
        );
    };
    counter("entry_changes_total", "Times the announcement started or stopped.", "", e.changes);
    counter("entry_errors_total", "Announcements or withdrawals the kernel refused.", "", e.errors);
    if e.mechanism == ringlb_core::entry::Mechanism::L2 {
        counter(
            "arp_answered_total",
            "ARP requests for the VIP answered while this node owned it.",
            "",
            e.arp.answered,
        );
        counter("arp_ignored_total", "ARP requests for the VIP heard while another node owned it.", "", e.arp.ignored);
        counter(
            "arp_gratuitous_sent_total",
            "Gratuitous ARP announcements of the VIP sent.",
            "",
            e.arp.gratuitous_sent,
        );
        counter("arp_dropped_total", "ARP frames dropped.", ",reason=\"malformed\"", e.arp.malformed);
        counter("arp_send_errors_total", "ARP frames the kernel refused to send.", "", e.arp.send_errors);
    }
    out
}

/// The edge's line of `ringlb status`.
fn edge_status(edge: Option<&EdgeView>) -> String {
    let Some(e) = edge else { return "entry: not managed by ringlb (entry.mode = \"none\")\n".to_owned() };
    let how = match e.mechanism {
        ringlb_core::entry::Mechanism::Bgp => format!("bgp (route in table {})", e.table),
        ringlb_core::entry::Mechanism::L2 => "l2 (ARP)".to_owned(),
    };
    let what = match (e.announced, e.withheld) {
        (true, _) => "announcing the VIP".to_owned(),
        (false, Some(why)) => format!("not announcing the VIP ({})", why.name()),
        (false, None) => "not announcing the VIP".to_owned(),
    };
    let mut line =
        format!("entry: {how}, {what} for {:.1} s, {} change(s)", e.since.elapsed().as_secs_f64(), e.changes);
    if e.mechanism == ringlb_core::entry::Mechanism::L2 {
        let owners = if e.owners.is_empty() { "none".to_owned() } else { e.owners.join(", ") };
        let _ = write!(
            line,
            "; owner: {owners}; ARP: {} answered, {} gratuitous sent",
            e.arp.answered, e.arp.gratuitous_sent
        );
    }
    if e.errors > 0 {
        let _ = write!(line, "; {} route change(s) refused (see the log)", e.errors);
    }
    line.push('\n');
    line
}

/// The health checks' metrics.
fn health_metrics(health: Option<&HealthView>, node: &str) -> String {
    let Some(h) = health else { return String::new() };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ringlb_app_healthy Whether the app passes its health checks ([health]); 0: no new flows.\n\
         # TYPE ringlb_app_healthy gauge\nringlb_app_healthy{{node=\"{node}\"}} {}",
        u8::from(h.state.takes_flows())
    );
    let _ = writeln!(
        out,
        "# HELP ringlb_health_checks_total Health checks of the app, by result.\n# TYPE ringlb_health_checks_total counter\n\
         ringlb_health_checks_total{{node=\"{node}\",result=\"ok\"}} {}\n\
         ringlb_health_checks_total{{node=\"{node}\",result=\"failed\"}} {}",
        h.checks_ok, h.checks_failed
    );
    out
}

/// The health checks' line of `ringlb status`.
fn health_status(health: Option<&HealthView>) -> String {
    let Some(h) = health else { return "health: no checks ([health] check = \"none\")\n".to_owned() };
    let what = match h.kind {
        crate::config::HealthKind::Http => format!("http GET {} on {}", h.path, h.target),
        _ => format!("tcp connect to {}", h.target),
    };
    let mut line = format!(
        "health: {what}: {} for {:.1} s ({} ok, {} failed)",
        h.state.name(),
        h.since.elapsed().as_secs_f64(),
        h.checks_ok,
        h.checks_failed
    );
    if !h.state.takes_flows() {
        line.push_str("; NO NEW FLOWS");
        if let Some(e) = &h.last_error {
            let _ = write!(line, "; last error: {e}");
        }
    }
    line.push('\n');
    line
}

/// The certificate the daemon presents: read at start and by each reload that took, not from
/// the file on disk, which may hold a newer one not loaded yet.
pub type LoadedCert = Arc<std::sync::Mutex<Option<(std::path::PathBuf, ringlb_control::certs::CertInfo)>>>;

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn loaded(cert: &LoadedCert) -> Option<(std::path::PathBuf, ringlb_control::certs::CertInfo)> {
    cert.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn cert_metrics(cert: &LoadedCert, node: &str) -> String {
    let Some((_, info)) = loaded(cert) else { return String::new() };
    format!(
        "# HELP ringlb_certificate_expiry_seconds Seconds until the certificate this node presents (control.cert, as loaded) expires.\n\
         # TYPE ringlb_certificate_expiry_seconds gauge\nringlb_certificate_expiry_seconds{{node=\"{node}\"}} {}\n",
        info.not_after - now_unix()
    )
}

fn cert_status(cert: &LoadedCert) -> String {
    let Some((path, info)) = loaded(cert) else { return String::new() };
    let left = info.not_after - now_unix();
    // A renewed file that was not reloaded yet is worth saying.
    let on_disk = ringlb_control::certs::read_info(&path).ok();
    let pending = match on_disk {
        Some(d) if d.not_after != info.not_after => {
            "; the file holds another certificate, not loaded yet: ringlb reload"
        }
        _ => "",
    };
    if left > 0 {
        format!(
            "certificate: {} for {}, expires in {:.1} days{}{pending}\n",
            path.display(),
            info.names.first().map_or("-", String::as_str),
            left as f64 / 86_400.0,
            if left < 7 * 86_400 { " (RENEW SOON: ringlb cert issue, then ringlb reload)" } else { "" }
        )
    } else {
        format!("certificate: {} has EXPIRED: peers refuse new connections{pending}\n", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringlb_dataplane::KernelDrops;

    #[test]
    fn kernel_drops_in_metrics_status_and_json() {
        let check = |drops: KernelDrops, metric_lines: &[&str], status_has: &str, json: serde_json::Value| {
            let s = Snapshot { kernel_drops: drops, ..Snapshot::default() };
            let m = metrics(&s, None, "n1");
            let ours: Vec<&str> = m.lines().filter(|l| l.starts_with("ringlb_kernel_dropped_packets_total{")).collect();
            assert_eq!(ours, metric_lines, "{drops:?}");
            assert!(m.contains("# TYPE ringlb_kernel_dropped_packets_total counter"));
            let text = status(&s, None, "n1");
            assert!(text.lines().any(|l| l.starts_with("overload: ") && l.contains(status_has)), "{text}");
            let side = Side { edge: None, health: None };
            assert_eq!(status_json(&s, None, side, "n1")["kernel_drops"], json, "{drops:?}");
        };
        check(
            KernelDrops { tun_queue: Some(41), carrier_socket: Some(0) },
            &[
                "ringlb_kernel_dropped_packets_total{node=\"n1\",where=\"tun_queue\"} 41",
                "ringlb_kernel_dropped_packets_total{node=\"n1\",where=\"carrier_socket\"} 0",
            ],
            "41 packets at the TUN's queue and 0 at the carrier socket before this daemon read them (more traffic",
            serde_json::json!({"tun_queue": 41, "carrier_socket": 0}),
        );
        check(
            KernelDrops { tun_queue: None, carrier_socket: Some(0) },
            &["ringlb_kernel_dropped_packets_total{node=\"n1\",where=\"carrier_socket\"} 0"],
            "an unknown number of packets at the TUN's queue and 0 at the carrier socket before this daemon read them",
            serde_json::json!({"tun_queue": null, "carrier_socket": 0}),
        );
    }
}
