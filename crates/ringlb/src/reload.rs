//! SIGHUP: read the configuration again and apply what may change while the daemon runs.
//!
//! Applied live: this node's weight, the health checks, and the certificate files (read again
//! even when their paths are unchanged, so a renewed certificate takes effect). Every other
//! key shapes sockets, devices or identities the daemon holds, so a change to it refuses the
//! whole reload with the key named, and the daemon goes on with what it had.

use std::net::IpAddr;
use std::path::PathBuf;

use ringlb_control::ControlHandle;
use ringlb_dataplane::NodeUpdate;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::{self, Config, HealthKind, Overrides};
use crate::health::{self, HealthStatus};

/// What a reload works with.
pub struct Reloader {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
    pub current: Config,
    pub control: Option<ControlHandle>,
    pub updates: mpsc::Sender<NodeUpdate>,
    pub health: HealthStatus,
    pub health_task: Option<tokio::task::JoinHandle<()>>,
    pub vip: IpAddr,
    /// The certificate presented now, for status and metrics.
    pub loaded_cert: crate::admin::LoadedCert,
    /// Sets the log filter (`log.level`), unless a flag or RINGLB_LOG fixed it.
    pub set_log_level: Option<LogLevelSetter>,
}

/// Replaces the process's log filter; the error names the bad value.
pub type LogLevelSetter = std::sync::Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Runs until the process ends: one reload per SIGHUP (`ringlb reload` takes the same lock).
pub async fn on_sighup(mut hup: tokio::signal::unix::Signal, reloader: std::sync::Arc<tokio::sync::Mutex<Reloader>>) {
    while hup.recv().await.is_some() {
        let _ = reloader.lock().await.reload().await;
    }
}

impl Reloader {
    /// Reads the configuration and applies it; the changes made, or why nothing was (logged
    /// either way).
    pub async fn reload(&mut self) -> Result<Vec<String>, String> {
        let result = self.apply().await;
        match &result {
            Ok(changes) if changes.is_empty() => tracing::info!("configuration reloaded: nothing changed"),
            Ok(changes) => tracing::info!(changes = %changes.join("; "), "configuration reloaded"),
            Err(e) => tracing::error!("reload refused, nothing changed: {e}"),
        }
        result
    }

    async fn apply(&mut self) -> Result<Vec<String>, String> {
        let new = config::load(self.path.as_deref(), &self.overrides).map_err(|e| e.replace('\n', "; "))?;
        let restart = needs_restart(&self.current, &new);
        if !restart.is_empty() {
            return Err(format!("{} (these need a restart)", restart.join("; ")));
        }
        let mut changes = Vec::new();
        let old_weight = self.current.local_member().map_or(1.0, |m| m.weight);
        let new_weight = new.local_member().map_or(1.0, |m| m.weight);
        let tls = new.control.as_ref().map(|c| ringlb_control::tls::TlsFiles {
            ca: c.ca.clone(),
            cert: c.cert.clone(),
            key: c.key.clone(),
        });
        if let (Some(control), Some(old_c), Some(new_c)) = (&self.control, &self.current.control, &new.control) {
            #[allow(clippy::cast_possible_truncation)] // validated to at most 1e6
            let weight = (new_weight != old_weight).then_some(new_weight as f32);
            let seeds = (new_c.seeds != old_c.seeds)
                .then(|| new_c.seeds.iter().filter_map(|s| config::parse_seed(s)).collect::<Vec<_>>());
            let cluster = (new_c.cluster_config() != old_c.cluster_config()).then(|| new_c.cluster_config());
            if seeds.is_some() {
                changes.push(format!("seeds {:?}", new_c.seeds));
            }
            if cluster.is_some() {
                changes.push("control timers and bounds".to_owned());
            }
            control.reload(ringlb_control::Reload { weight, tls, seeds, cluster }).await?;
            changes.push("certificates read again".to_owned());
            let info = ringlb_control::certs::read_info(&new_c.cert).ok().map(|i| (new_c.cert.clone(), i));
            *self.loaded_cert.lock().unwrap_or_else(|e| e.into_inner()) = info;
        }
        if new.log.level != self.current.log.level {
            if let Some(set) = &self.set_log_level {
                set(&new.log.level)?;
                changes.push(format!("log level {:?}", new.log.level));
            }
        }
        if new_weight != old_weight {
            let _ = self.updates.send(NodeUpdate::Weight(new_weight)).await;
            changes.push(format!("weight {old_weight} -> {new_weight}"));
        }
        if new.health != self.current.health {
            if let Some(task) = self.health_task.take() {
                task.abort();
            }
            self.health.clear();
            if new.health.check == HealthKind::None {
                match &self.control {
                    Some(c) => drop(c.set_app_healthy(true).await),
                    None => drop(self.updates.send(NodeUpdate::Drain(false)).await),
                }
            } else {
                self.health_task = Some(health::spawn(
                    new.health.clone(),
                    self.vip,
                    self.control.clone(),
                    self.updates.clone(),
                    self.health.clone(),
                ));
            }
            changes.push(format!("health checks: {:?}", new.health.check).to_lowercase());
        }
        self.current = new;
        Ok(changes)
    }
}

/// The keys whose values differ between `old` and `new` and that a running daemon cannot take,
/// each as `key: old -> new`.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let blank = |c: &Config| {
        let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
        // What a reload applies.
        v["node"]["weight"] = Value::Null;
        v["health"] = Value::Null;
        v["log"] = Value::Null;
        for key in [
            "ca",
            "cert",
            "key",
            "seeds",
            "probe_interval",
            "suspicion_timeout",
            "dead_expiry",
            "max_members",
            "max_weight",
        ] {
            if v["control"].is_object() {
                v["control"][key] = Value::Null;
            }
        }
        if let Some(members) = v["members"].as_array_mut() {
            for m in members.iter_mut().filter(|m| m["name"] == c.node.name.as_str()) {
                m["weight"] = Value::Null;
            }
        }
        v
    };
    let mut out = Vec::new();
    diff("", &blank(old), &blank(new), &mut out);
    out
}

fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                diff(&sub, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::result_large_err)] // figment::Jail's signature, not ours
    /// Loads a config inside a figment Jail: other tests of this binary set RINGLB_ variables,
    /// and the Jail keeps them (and their races) out.
    fn config(extra: &str) -> Config {
        let text = format!(
            "[node]\nname = \"n1\"\nvip = \"10.200.0.10\"\nunderlay_interface = \"lo\"\n\
             address = \"10.77.0.1\"\n{extra}\n[[members]]\nname = \"n2\"\naddr = \"10.77.0.2\"\n"
        );
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", &text)?;
            out = Some(config::load(Some(std::path::Path::new("c.toml")), &Overrides::default()));
            Ok(())
        });
        out.expect("the jail ran").expect("the config loads")
    }

    #[test]
    fn weight_and_health_reload_live_and_the_vip_needs_a_restart() {
        let old = config("weight = 1.0");
        assert!(needs_restart(&old, &config("weight = 0.0\n\n[health]\ncheck = \"tcp\"\n\n[log]\nlevel = \"debug\""))
            .is_empty());
        let mut moved = old.clone();
        moved.node.vip = "10.200.0.11".parse().unwrap();
        assert_eq!(needs_restart(&old, &moved), vec!["node.vip: \"10.200.0.10\" -> \"10.200.0.11\"".to_owned()]);
        let mut carrier = old.clone();
        carrier.carrier.port = 7000;
        assert_eq!(needs_restart(&old, &carrier), vec!["carrier.port: 6635 -> 7000".to_owned()]);
        // Another member's weight in a static list is not this node's to change live.
        let mut other = old.clone();
        other.members[0].weight = 3.0;
        let changed = needs_restart(&old, &other);
        assert!(changed.len() == 1 && changed[0].starts_with("members: "), "{changed:?}");
    }
}
