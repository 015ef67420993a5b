//! The kinds of member the supervisor runs: what each one's process is, which ports it
//! takes, and how its health is read. The supervisor itself knows none of this.

pub mod etcd;
pub mod faafo;
pub mod postgres;
pub mod swift;
mod tls;

pub use tls::Tls;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

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
    /// `faafo probe`: the synthetic user, through the gateways.
    #[serde(rename = "probe")]
    Probe,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Etcd,
        Kind::Postgres,
        Kind::SwiftRsync,
        Kind::SwiftNode,
        Kind::SwiftProxy,
        Kind::Api,
        Kind::Gateway,
        Kind::Worker,
        Kind::Probe,
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
            Kind::Probe => "probe",
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
    /// object servers', a gateway, an API, a proxy, the rsync daemon or the probe (its
    /// metrics) one.
    pub fn port_count(self) -> usize {
        match self {
            Kind::SwiftNode => 3,
            Kind::Etcd | Kind::Postgres => 2,
            Kind::Api | Kind::Gateway | Kind::SwiftProxy | Kind::SwiftRsync | Kind::Probe => 1,
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
    /// The gateways' URLs, for the probe.
    pub gateways: Vec<String>,
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
        let patroni = match std::env::var_os(PATRONI_PROGRAM).map(PathBuf::from) {
            Some(chosen) => {
                anyhow::ensure!(
                    chosen.exists(),
                    "{PATRONI_PROGRAM}={} does not exist",
                    chosen.display()
                );
                Some(chosen)
            }
            // Patroni's own shebang names the system Python; a python3 earlier on PATH
            // (a pyenv shim) may not see its modules, so the system copy comes first.
            None => Some(PathBuf::from("/usr/bin/patroni"))
                .filter(|p| p.exists())
                .or_else(|| find_program("patroni")),
        };
        if let Some(patroni) = &patroni {
            check_patroni_version(patroni)?;
        }
        let postgres_bin = postgres::bin_dir();
        let mut missing = Vec::new();
        if etcd.is_none() {
            missing.push("etcd-server");
        }
        if postgres_bin.is_none() {
            missing.push("postgresql");
        }
        let (Some(etcd), Some(postgres_bin)) = (etcd, postgres_bin) else {
            anyhow::bail!(
                "--postgres-nodes needs etcd and the PostgreSQL server, which are not installed: \
                 apt-get install --no-install-recommends {}",
                missing.join(" ")
            );
        };
        let Some(patroni) = patroni else {
            anyhow::bail!(
                "--postgres-nodes needs Patroni 3.1.2 or later, which is not installed. {INSTALL_PATRONI}"
            );
        };
        Ok(Programs {
            etcd,
            patroni,
            postgres_bin,
        })
    }
}

/// Names the Patroni program to run, overriding the one found on the machine.
pub const PATRONI_PROGRAM: &str = "FAAFO_PATRONI_PROGRAM";

/// How to get a Patroni that is safe to run (Debian 12 ships 3.0.2).
const INSTALL_PATRONI: &str = "Install one from PyPI, for example `/usr/bin/python3 -m venv \
     /opt/patroni && /opt/patroni/bin/pip install 'patroni[etcd3]==3.3.11' psycopg2-binary`, \
     and name it with FAAFO_PATRONI_PROGRAM=/opt/patroni/bin/patroni";

/// Refuses a Patroni known to lose acknowledged writes in a failover (see
/// [`faafo_store::patroni::SAFE_VERSION`]; both bugs were seen here, with Debian 12's
/// 3.0.2 in the multi-host isolation test and with 3.0.4 in the Patroni failover test).
fn check_patroni_version(patroni: &Path) -> anyhow::Result<()> {
    let output = std::process::Command::new(patroni)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", patroni.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.trim().trim_start_matches("patroni ");
    match faafo_store::patroni::loses_acknowledged_writes(version) {
        None => anyhow::bail!(
            "cannot tell the version of {} from {text:?}",
            patroni.display()
        ),
        Some(true) => anyhow::bail!(
            "{} is Patroni {version}: {}. {INSTALL_PATRONI}",
            patroni.display(),
            faafo_store::patroni::UNSAFE_VERSION_REASON
        ),
        Some(false) => {}
    }
    Ok(())
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
