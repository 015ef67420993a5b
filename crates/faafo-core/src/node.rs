//! Membership: every gateway, API and worker announces itself in the store, so that
//! `faafo status` can list the whole deployment and a client given one address can learn
//! the others (`GET /v1/endpoints`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The version every node reports: the workspace's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often a node announces itself.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// A node not heard from for this long counts as down: three heartbeats missed.
pub const DOWN_AFTER: Duration = Duration::from_secs(6);

/// A node not heard from for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Longest node id accepted.
pub const MAX_ID_LENGTH: usize = 200;

/// What a process does in the deployment.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Gateway,
    Api,
    Worker,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Gateway => "gateway",
            NodeRole::Api => "api",
            NodeRole::Worker => "worker",
        }
    }
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeRole {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "gateway" => Ok(NodeRole::Gateway),
            "api" => Ok(NodeRole::Api),
            "worker" => Ok(NodeRole::Worker),
            other => Err(format!("unknown node role {other:?}")),
        }
    }
}

/// What a node says of itself at each heartbeat (`POST /v1/nodes/heartbeat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeBeat {
    /// Stable across restarts of the same member (a gateway's or API's address, a
    /// worker's name), so a restarted process takes over its own entry.
    #[schema(min_length = 1, max_length = 200, pattern = "\\S")]
    pub id: String,
    pub role: NodeRole,
    /// Where clients reach it (`http://host:port`): gateways and APIs; workers have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 300, pattern = "^https?://.")]
    pub address: Option<String>,
    #[schema(max_length = 64)]
    pub version: String,
    /// Tasks rendered (workers) or requests served (gateways, APIs) since it started.
    #[serde(default)]
    #[schema(maximum = 9223372036854775807_u64)]
    pub load: u64,
}

impl NodeBeat {
    /// Checks what a remote node sent; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let id_length = self.id.chars().count();
        if self.id.trim().is_empty() || id_length > MAX_ID_LENGTH {
            return Err(format!(
                "id must be 1 to {MAX_ID_LENGTH} characters, not only spaces, got {id_length} characters"
            ));
        }
        if self.version.chars().count() > 64 {
            return Err("version must be at most 64 characters".into());
        }
        // Stored as a signed 64-bit number.
        if i64::try_from(self.load).is_err() {
            return Err(format!("load must be at most {}", i64::MAX));
        }
        match (&self.address, self.role) {
            (None, NodeRole::Worker) => Ok(()),
            (None, role) => Err(format!("a {role} must give its address")),
            (Some(address), _) => {
                let valid = address.chars().count() <= 300
                    && (address.starts_with("http://") || address.starts_with("https://"))
                    && address
                        .split("://")
                        .nth(1)
                        .is_some_and(|rest| !rest.is_empty());
                if valid {
                    Ok(())
                } else {
                    Err(format!("address must be http://host:port, got {address:?}"))
                }
            }
        }
    }
}

/// Whether a node is serving, as far as its heartbeats tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Up,
    /// Heartbeats stopped without a goodbye: killed, hung or cut off.
    Down,
    /// Said goodbye on a clean shutdown.
    Left,
}

/// One node, as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub id: String,
    pub role: NodeRole,
    pub address: Option<String>,
    pub version: String,
    pub load: u64,
    pub state: Liveness,
    /// Seconds since its last heartbeat.
    pub last_seen_s: f64,
}

/// The queue, as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueView {
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    /// Seconds the oldest queued task has waited.
    pub oldest_queued_age_s: Option<f64>,
}

/// One member of a replicated database, as its manager (Patroni) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatabaseMemberView {
    pub name: String,
    /// `leader`, `sync_standby` or `replica`.
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped`, ...
    pub state: String,
    /// Where its PostgreSQL listens.
    pub address: Option<String>,
    /// Bytes of WAL it is behind the leader (standbys), when known.
    pub lag_bytes: Option<u64>,
}

/// `GET /v1/nodes`: every node and the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterStatus {
    pub nodes: Vec<NodeView>,
    pub queue: QueueView,
    /// The database's members, when the store knows them (PostgreSQL under Patroni).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub database: Vec<DatabaseMemberView>,
}

/// One round of a probe (`faafo probe`): when it ended, whether it made, fetched and
/// verified its fractal, and how long it took or at which step it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeOutcome {
    /// When the round ended, in milliseconds since the Unix epoch.
    pub finished_at_ms: i64,
    pub ok: bool,
    /// The whole round, in milliseconds.
    #[schema(minimum = 0)]
    pub total_ms: f64,
    /// The step that failed (create, render, download, verify, delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 20)]
    pub failed_step: Option<String>,
}

/// `POST /v1/probes`: a probe's rounds not yet reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeReports {
    /// The probe's name.
    #[schema(min_length = 1, max_length = 200)]
    pub probe: String,
    #[schema(max_items = 1000)]
    pub outcomes: Vec<ProbeOutcome>,
}

/// `GET /v1/endpoints`: where clients can send requests, live nodes only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Endpoints {
    pub gateways: Vec<String>,
    pub apis: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(role: NodeRole, address: Option<&str>) -> NodeBeat {
        NodeBeat {
            id: "n1".into(),
            role,
            address: address.map(str::to_owned),
            version: "0.1.0".into(),
            load: 0,
        }
    }

    #[test]
    fn beats_are_checked() {
        assert!(beat(NodeRole::Worker, None).validate().is_ok());
        assert!(
            beat(NodeRole::Gateway, Some("http://127.0.0.1:9100"))
                .validate()
                .is_ok()
        );
        let error = beat(NodeRole::Gateway, None).validate().unwrap_err();
        assert!(error.contains("address"), "{error}");
        assert!(beat(NodeRole::Api, Some("ftp://x")).validate().is_err());
        assert!(beat(NodeRole::Api, Some("http://")).validate().is_err());
        let mut long = beat(NodeRole::Worker, None);
        long.id = "x".repeat(MAX_ID_LENGTH + 1);
        assert!(long.validate().is_err());
        long.id = " ".into();
        assert!(long.validate().is_err());
    }

    #[test]
    fn roles_round_trip() {
        for role in [NodeRole::Gateway, NodeRole::Api, NodeRole::Worker] {
            assert_eq!(role.as_str().parse::<NodeRole>(), Ok(role));
        }
        assert!("db".parse::<NodeRole>().is_err());
    }
}
