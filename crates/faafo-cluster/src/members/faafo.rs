//! The faafo members: gateways, API instances, workers and the probe, each this same
//! binary with the flags a user would give it.

use serde::Deserialize;

use super::{Health, Kind, Topology};

/// Seconds between the cluster probe's rounds.
pub const PROBE_INTERVAL: &str = "10";

/// How the API instances reach the data.
#[derive(Debug, Clone)]
pub struct Backing {
    pub database_url: String,
    /// Patroni's REST endpoints, when PostgreSQL runs under Patroni.
    pub patroni: Vec<String>,
    pub object_store: String,
    /// Give the API the Swift cluster's S3 credentials (tempauth's user).
    pub s3_credentials: bool,
    /// Extra flags for `faafo api` (lease and attempt settings).
    pub api_args: Vec<String>,
}

/// Sets up `command` (this binary) to run a faafo member.
pub fn configure(
    command: &mut tokio::process::Command,
    kind: Kind,
    name: &str,
    bind: Option<&str>,
    topology: &Topology,
    backing: &Backing,
) {
    let apis = &topology.apis;
    match kind {
        Kind::Gateway => {
            command.args(["gateway", "--discover", "--bind"]);
            command.arg(bind.unwrap_or_default());
            for api in apis {
                command.args(["--backend", api]);
            }
        }
        Kind::Api => {
            command.args(["api", "--bind"]);
            command.arg(bind.unwrap_or_default());
            // Through the environment: the URL may hold a password, and the environment
            // of a process is not shown by `ps`.
            command.env("FAAFO_DATABASE_URL", &backing.database_url);
            if backing.patroni.is_empty() {
                command.env_remove("FAAFO_PATRONI");
            } else {
                command.env("FAAFO_PATRONI", backing.patroni.join(","));
            }
            command.args(["--object-store", &backing.object_store]);
            if backing.s3_credentials {
                command
                    .env("AWS_ACCESS_KEY_ID", super::swift::ACCESS_KEY)
                    .env("AWS_SECRET_ACCESS_KEY", super::swift::SECRET_KEY);
            }
            command.args(&backing.api_args);
        }
        Kind::Worker => {
            command.args(["--endpoint-url", &apis.join(",")]);
            command.args(["worker", "--name"]);
            command.arg(format!(
                "{}-{name}",
                gethostname::gethostname().to_string_lossy()
            ));
        }
        Kind::Probe => {
            // As users come in: through the gateways, or the APIs when there are none.
            let entry = if topology.gateways.is_empty() {
                apis
            } else {
                &topology.gateways
            };
            command.args(["--endpoint-url", &entry.join(",")]);
            command.args(["probe", "--interval", PROBE_INTERVAL, "--name"]);
            command.arg(format!(
                "{}-{name}",
                gethostname::gethostname().to_string_lossy()
            ));
            command.arg("--bind").arg(bind.unwrap_or_default());
        }
        other => unreachable!("{other} is not a faafo member"),
    }
}

/// The part of a gateway's `/__stats.json` the supervisor reads.
#[derive(Debug, Deserialize)]
pub struct GatewayStats {
    pub backends: Vec<GatewayBackend>,
}

#[derive(Debug, Deserialize)]
pub struct GatewayBackend {
    pub url: String,
    pub state: String,
}

/// `/readyz` of an API instance.
pub async fn api_health(http: &reqwest::Client, url: &str) -> Health {
    match http.get(format!("{url}/readyz")).send().await {
        Ok(r) if r.status().is_success() => Health::ready("ready"),
        Ok(r) => {
            let status = r.status();
            let reason = r.text().await.unwrap_or_default();
            Health::not(format!("not ready ({status}) {}", reason.trim()))
        }
        Err(_) => Health::not("no answer"),
    }
}

/// A gateway is ready once it has a backend up.
pub async fn gateway_health(http: &reqwest::Client, url: &str) -> Health {
    match gateway_stats(http, url).await {
        Some(stats) => {
            let up = stats.backends.iter().filter(|b| b.state == "up").count();
            let text = format!("{up}/{} backends up", stats.backends.len());
            Health {
                ready: up > 0,
                text,
            }
        }
        None => Health::not("no answer"),
    }
}

pub async fn gateway_stats(http: &reqwest::Client, url: &str) -> Option<GatewayStats> {
    let answer = http.get(format!("{url}/__stats.json")).send().await.ok()?;
    if !answer.status().is_success() {
        return None;
    }
    answer.json().await.ok()
}

/// The probe's own account of its latest round, from its metrics.
pub async fn probe_health(http: &reqwest::Client, address: std::net::SocketAddr) -> Health {
    let page = match http.get(format!("http://{address}/metrics")).send().await {
        Ok(answer) if answer.status().is_success() => answer.text().await.unwrap_or_default(),
        _ => return Health::not("no answer"),
    };
    let sample = |name: &str| {
        page.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
    };
    let runs = sample(r#"faafo_probe_runs_total{outcome="ok"}"#).unwrap_or(0.0)
        + sample(r#"faafo_probe_runs_total{outcome="failed"}"#).unwrap_or(0.0);
    // Ready means running: a failing probe is news about the service, not about itself.
    match sample("faafo_probe_success") {
        _ if runs == 0.0 => Health::ready("no probe yet"),
        Some(1.0) => Health::ready("users' fractals are made"),
        _ => Health::ready("FAILING: users' fractals are not made (see its log)"),
    }
}
