//! The faafo members: gateways, API instances and workers, each this same binary with
//! the flags a user would give it.

use serde::Deserialize;

use super::{Health, Kind};

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
    apis: &[String],
    backing: &Backing,
) {
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
