//! The local admin endpoint: `/metrics` (Prometheus text) and `/status` (a table for people).
//!
//! A deliberately tiny HTTP/1.0 responder: one GET per connection, no keep-alive. It reads the
//! snapshot the packet loop hands out on request, never the live core.

use std::fmt::Write as _;
use std::net::SocketAddr;

use ringlb_core::{DropReason, MemberState};
use ringlb_dataplane::{Snapshot, SnapshotRequests};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn serve(listener: TcpListener, snapshots: SnapshotRequests, node: String) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let snapshots = snapshots.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let Some(snapshot) = snapshots.get().await else { return };
            if let Err(e) = answer(stream, &snapshot, &node).await {
                tracing::debug!(%peer, error = %e, "admin request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, snapshot: &Snapshot, node: &str) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/metrics" => ("200 OK", metrics(snapshot, node)),
        "/status" => ("200 OK", status(snapshot, node)),
        _ => ("404 Not Found", "try /metrics or /status\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Draining => "draining",
        MemberState::Dead => "dead",
    }
}

/// Prometheus text exposition.
pub fn metrics(s: &Snapshot, node: &str) -> String {
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
    counter("flows_evicted_total", "Flows evicted because the table was full.", c.flows_evicted);
    let _ = writeln!(
        out,
        "# HELP ringlb_placements_total New flows placed, by outcome.\n# TYPE ringlb_placements_total counter"
    );
    for (outcome, v) in
        [("local", c.placed_local), ("peer", c.placed_peer), ("hash_fallback", c.placed_by_hash_fallback)]
    {
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
        "# HELP ringlb_flows Flows tracked.\n# TYPE ringlb_flows gauge\nringlb_flows{{node=\"{node}\"}} {}",
        s.flows
    );
    let _ = writeln!(out, "# HELP ringlb_peer_flows Flows pinned to each member.\n# TYPE ringlb_peer_flows gauge");
    for m in &s.members {
        let _ = writeln!(out, "ringlb_peer_flows{{node=\"{node}\",peer=\"{}\"}} {}", m.name, m.flows);
    }
    let _ = writeln!(out, "# HELP ringlb_peer_forwarded_packets_total Packets forwarded to each peer.\n# TYPE ringlb_peer_forwarded_packets_total counter");
    for m in s.members.iter().filter(|m| !m.is_local) {
        let _ = writeln!(
            out,
            "ringlb_peer_forwarded_packets_total{{node=\"{node}\",peer=\"{}\"}} {}",
            m.name, m.forwarded_packets
        );
    }
    out
}

/// The member table and the main counters, for `ringlb status`.
pub fn status(s: &Snapshot, node: &str) -> String {
    let c = &s.counters;
    let mut out = format!("node {node}: {} flows tracked, {} dropped packets\n", s.flows, c.total_drops());
    let _ = writeln!(
        out,
        "{:<12} {:<16} {:<9} {:>6} {:>8} {:>12}",
        "MEMBER", "ADDRESS", "STATE", "WEIGHT", "FLOWS", "FORWARDED"
    );
    for m in &s.members {
        let name = if m.is_local { format!("{} *", m.name) } else { m.name.clone() };
        let fwd = if m.is_local { "-".to_owned() } else { m.forwarded_packets.to_string() };
        let _ = writeln!(
            out,
            "{:<12} {:<16} {:<9} {:>6} {:>8} {:>12}",
            name,
            m.addr,
            state_name(m.state),
            m.weight,
            m.flows,
            fwd
        );
    }
    let _ = writeln!(
        out,
        "packets: {} delivered locally, {} forwarded, {} received from peers",
        c.delivered_local, c.forwarded, c.decapsulated
    );
    let drops: Vec<String> =
        DropReason::ALL.iter().filter(|r| c.drops(**r) > 0).map(|r| format!("{}={}", r.name(), c.drops(*r))).collect();
    if !drops.is_empty() {
        let _ = writeln!(out, "drops: {}", drops.join(" "));
    }
    out
}

/// Fetches `path` from a node's admin endpoint (the `ringlb status` client).
pub async fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await?;
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await?;
    Ok(resp.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or(resp))
}
