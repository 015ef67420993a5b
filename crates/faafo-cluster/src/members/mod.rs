//! The kinds of member the supervisor runs: what each one's process is, which ports it
//! takes, and how its health is read. The supervisor itself knows none of this.

pub mod etcd;
pub mod faafo;
pub mod postgres;
pub mod swift;

use std::net::IpAddr;
use std::path::PathBuf;

use faafo_core::NodeRole;
use serde::{Deserialize, Serialize};

/// What a member is. The order is the start order: the data tier first, then the APIs,
/// the gateways in front of them and the workers that need them; stops go the other way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[serde(rename = "etcd")]
    Etcd,
    #[serde(rename = "postgres")]
    Postgres,
    /// The rsync daemon Swift's container and account replicators push to.
    #[serde(rename = "swift-rsync")]
    SwiftRsync,
    /// A Swift storage node: account, container and object servers, replicators and
    /// updaters.
    #[serde(rename = "swift")]
    SwiftNode,
    /// A Swift proxy serving S3; one per API instance.
    #[serde(rename = "swift-proxy")]
    SwiftProxy,
    #[serde(rename = "api")]
    Api,
    #[serde(rename = "gateway")]
    Gateway,
    #[serde(rename = "worker")]
    Worker,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Etcd,
        Kind::Postgres,
        Kind::SwiftRsync,
        Kind::SwiftNode,
        Kind::SwiftProxy,
        Kind::Api,
        Kind::Gateway,
        Kind::Worker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Etcd => "etcd",
            Kind::Postgres => "postgres",
            Kind::SwiftRsync => "swift-rsync",
            Kind::SwiftNode => "swift",
            Kind::SwiftProxy => "swift-proxy",
            Kind::Api => "api",
            Kind::Gateway => "gateway",
            Kind::Worker => "worker",
        }
    }

    /// A group name as `stop`, `start`, `restart` and `scale` take it.
    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| text == k.as_str() || text.strip_suffix('s') == Some(k.as_str()))
    }

    /// The faafo role of the process, for the faafo members.
    pub fn node_role(self) -> Option<NodeRole> {
        match self {
            Kind::Api => Some(NodeRole::Api),
            Kind::Gateway => Some(NodeRole::Gateway),
            Kind::Worker => Some(NodeRole::Worker),
            _ => None,
        }
    }

    /// Whether `scale` may change how many there are. The data tier's size is fixed when
    /// the cluster is made: its members know each other from their configuration.
    pub fn scalable(self) -> bool {
        self.node_role().is_some()
    }

    /// How many ports one member takes: etcd a client and a peer port, a postgres member
    /// PostgreSQL's and its Patroni REST API's, a Swift node its account, container and
    /// object servers', a gateway, an API, a proxy or the rsync daemon one.
    pub fn port_count(self) -> usize {
        match self {
            Kind::SwiftNode => 3,
            Kind::Etcd | Kind::Postgres => 2,
            Kind::Api | Kind::Gateway | Kind::SwiftProxy | Kind::SwiftRsync => 1,
            Kind::Worker => 0,
        }
    }

    /// Whether killing a member of this kind takes a replica of the data with it, so
    /// chaos never kills a second one while one is still recovering.
    pub fn holds_data(self) -> bool {
        matches!(self, Kind::Etcd | Kind::Postgres | Kind::SwiftNode)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the members of one cluster find each other.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The address every member listens on.
    pub host: IpAddr,
    /// The APIs' URLs, for gateways and workers.
    pub apis: Vec<String>,
    /// `host:port` of every etcd member's client and peer ports, by member.
    pub etcd: Vec<etcd::Peer>,
    /// Every postgres member's PostgreSQL and Patroni REST ports.
    pub postgres: Vec<postgres::Node>,
    /// Swift: the storage nodes, the proxies by name, and the rsync daemon.
    pub swift_nodes: Vec<swift::StorageNode>,
    pub swift_proxies: Vec<(String, std::net::SocketAddr)>,
    pub swift_rsync: Option<std::net::SocketAddr>,
}

impl Topology {
    /// Patroni's REST endpoints, as `faafo api --patroni` takes them.
    pub fn patroni_urls(&self) -> Vec<String> {
        self.postgres
            .iter()
            .map(|node| format!("http://{}", node.rest))
            .collect()
    }
}

/// The programs of the data tier, found on this machine.
#[derive(Debug, Clone)]
pub struct Programs {
    pub etcd: PathBuf,
    pub patroni: PathBuf,
    /// PostgreSQL's server binaries (`postgres`, `initdb`, `pg_rewind`, ...).
    pub postgres_bin: PathBuf,
}

impl Programs {
    /// Looks for etcd, Patroni and PostgreSQL; the error names the Debian packages to
    /// install.
    pub fn find() -> anyhow::Result<Programs> {
        let etcd = find_program("etcd");
        let patroni = ["/usr/bin/patroni"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            // Patroni's own shebang names the system Python; a python3 earlier on PATH
            // (a pyenv shim) may not see its modules, so the system copy comes first.
            .or_else(|| find_program("patroni"));
        let postgres_bin = postgres::bin_dir();
        let mut missing = Vec::new();
        if etcd.is_none() {
            missing.push("etcd-server");
        }
        if patroni.is_none() {
            missing.push("patroni");
        }
        if postgres_bin.is_none() {
            missing.push("postgresql");
        }
        match (etcd, patroni, postgres_bin) {
            (Some(etcd), Some(patroni), Some(postgres_bin)) => Ok(Programs {
                etcd,
                patroni,
                postgres_bin,
            }),
            _ => anyhow::bail!(
                "--postgres-nodes needs etcd, Patroni and the PostgreSQL server, which are not installed: \
                 apt-get install --no-install-recommends {}",
                missing.join(" ")
            ),
        }
    }
}

/// Checks that OpenStack Swift and rsync are installed; the error names the Debian
/// packages.
pub fn check_swift() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("swift-ring-builder", "swift"),
        ("swift-proxy-server", "swift-proxy"),
        ("swift-object-server", "swift-object"),
        ("swift-container-server", "swift-container"),
        ("swift-account-server", "swift-account"),
        ("rsync", "rsync"),
    ]
    .into_iter()
    .filter(|(program, _)| find_program(program).is_none())
    .map(|(_, package)| package)
    .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "--swift-nodes needs OpenStack Swift and rsync, which are not installed: \
         apt-get install --no-install-recommends {}",
        missing.join(" ")
    );
    Ok(())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// What `cluster status` says of a member's health; `ready` decides when a start is done.
#[derive(Debug, Clone)]
pub struct Health {
    pub ready: bool,
    pub text: String,
}

impl Health {
    pub fn ready(text: impl Into<String>) -> Health {
        Health {
            ready: true,
            text: text.into(),
        }
    }

    pub fn not(text: impl Into<String>) -> Health {
        Health {
            ready: false,
            text: text.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse_in_both_numbers() {
        assert_eq!(Kind::parse("postgres"), Some(Kind::Postgres));
        assert_eq!(Kind::parse("etcd"), Some(Kind::Etcd));
        assert_eq!(Kind::parse("apis"), Some(Kind::Api));
        assert_eq!(Kind::parse("workers"), Some(Kind::Worker));
        assert_eq!(Kind::parse("db"), None);
        assert!(Kind::Etcd < Kind::Postgres && Kind::Postgres < Kind::Api);
        assert!(Kind::Api < Kind::Gateway && Kind::Gateway < Kind::Worker);
        assert!(Kind::Postgres < Kind::SwiftNode && Kind::SwiftProxy < Kind::Api);
        assert_eq!(Kind::parse("swift"), Some(Kind::SwiftNode));
        assert_eq!(Kind::parse("swift-proxy"), Some(Kind::SwiftProxy));
    }
}
