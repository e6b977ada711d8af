//! The app's health checks (`[health]`): a TCP connect or an HTTP GET to the VIP on this node,
//! every `health.interval`. [`ringlb_core::health::HealthCheck`] turns the results into a state;
//! while the app is not healthy the node takes no new flows (the control plane tells the peers
//! and the data plane) and keeps the flows it has, and the edge stops offering the node as an
//! entry.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use ringlb_control::ControlHandle;
use ringlb_core::health::{AppHealth, HealthCheck};
use ringlb_core::Timestamp;
use ringlb_dataplane::NodeUpdate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{HealthKind, HealthSection};

/// What the admin endpoint and the edge read.
#[derive(Debug, Clone)]
pub struct HealthView {
    pub kind: HealthKind,
    pub target: SocketAddr,
    pub path: String,
    pub state: AppHealth,
    pub since: Instant,
    pub checks_ok: u64,
    pub checks_failed: u64,
    /// Why the last failed check failed.
    pub last_error: Option<String>,
}

/// Shared between the checker and its readers; `None` without `[health]`.
#[derive(Debug, Clone, Default)]
pub struct HealthStatus(Arc<Mutex<Option<HealthView>>>);

impl HealthStatus {
    pub fn get(&self) -> Option<HealthView> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// False only while a configured check says the app is not healthy.
    pub fn takes_flows(&self) -> bool {
        self.get().is_none_or(|v| v.state.takes_flows())
    }

    /// No checks (any more).
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn set(&self, view: HealthView) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }
}

/// Starts the checker on the current runtime. Until the first check succeeds, the node takes no
/// new flows.
pub fn spawn(
    config: HealthSection,
    vip: IpAddr,
    control: Option<ControlHandle>,
    updates: mpsc::Sender<NodeUpdate>,
    status: HealthStatus,
) -> tokio::task::JoinHandle<()> {
    // Unknown until the first check: the node takes no new flows and the edge does not offer it
    // in the meantime, however soon they look.
    status.set(HealthView {
        kind: config.check,
        target: SocketAddr::new(vip, config.port),
        path: config.path.clone(),
        state: AppHealth::Unknown,
        since: Instant::now(),
        checks_ok: 0,
        checks_failed: 0,
        last_error: None,
    });
    tokio::spawn(async move {
        let origin = Instant::now();
        let stamp = |t: Instant| Timestamp::from_duration(t.duration_since(origin));
        let target = SocketAddr::new(vip, config.port);
        let mut check = HealthCheck::new(config.rise, config.fall, stamp(origin));
        let mut since = origin;
        let tell = |healthy: bool| {
            let (control, updates) = (control.clone(), updates.clone());
            async move {
                match &control {
                    Some(c) => drop(c.set_app_healthy(healthy).await),
                    None => drop(updates.send(NodeUpdate::Drain(!healthy)).await),
                }
            }
        };
        tell(false).await;
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = None;
        loop {
            tick.tick().await;
            let result = tokio::time::timeout(config.timeout, probe(&config, target)).await;
            let result = result.unwrap_or_else(|_| Err(format!("no answer within {:?}", config.timeout)));
            let now = Instant::now();
            if let Err(e) = &result {
                last_error = Some(e.clone());
            }
            if let Some(state) = check.record(stamp(now), result.is_ok()) {
                since = now;
                match state {
                    AppHealth::Healthy => tracing::info!(%target, "the app passes its health checks: taking new flows"),
                    _ => tracing::warn!(
                        %target, error = last_error.as_deref().unwrap_or("-"),
                        "the app fails its health checks: no new flows until it recovers"
                    ),
                }
                tell(state.takes_flows()).await;
            }
            status.set(HealthView {
                kind: config.check,
                target,
                path: config.path.clone(),
                state: check.state(),
                since,
                checks_ok: check.checks_ok,
                checks_failed: check.checks_failed,
                last_error: last_error.clone(),
            });
        }
    })
}

/// One check: Ok when the app answered as it should.
async fn probe(config: &HealthSection, target: SocketAddr) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(target).await.map_err(|e| format!("connect: {e}"))?;
    if config.check == HealthKind::Tcp {
        return Ok(());
    }
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: ringlb-health\r\nConnection: close\r\n\r\n",
        config.path,
        target.ip()
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = stream.read(&mut buf[got..]).await.map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let code = parse_status(&buf[..got]).ok_or_else(|| "not an HTTP answer".to_owned())?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..12)?).ok()?;
    let rest = text.strip_prefix("HTTP/1.")?;
    let (_, code) = rest.split_once(' ')?;
    code.get(..3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_status;

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH_9\r\n"), None);
    }
}
