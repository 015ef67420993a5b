//! Postgres members: each is a Patroni process managing its own PostgreSQL server, the
//! leader elected through etcd, with synchronous replication so that a commit
//! acknowledged by the leader is on a standby too, and that standby is the only one
//! Patroni may promote.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Health, Tls, etcd};

/// Patroni's timings. ttl 20 s is the least Patroni accepts (the releases faafo allows
/// raise a smaller one to 20): a dead or cut-off leader's key expires within 20 s and a
/// standby takes over; loop_wait 1 s renews it every second; a leader that cannot reach
/// etcd for retry_timeout 3 s demotes itself (Patroni asks loop_wait + 2 x retry_timeout
/// <= ttl). faafo's fence trusts a confirmation of the leader for 4 s
/// ([`faafo_store::patroni::FENCE_WINDOW`]), well inside ttl - loop_wait - retry_timeout.
pub const TTL_S: u64 = 20;
pub const LOOP_WAIT_S: u64 = 1;
pub const RETRY_TIMEOUT_S: u64 = 3;
const _: () =
    assert!(faafo_store::patroni::FENCE_WINDOW.as_secs() <= TTL_S - LOOP_WAIT_S - RETRY_TIMEOUT_S);
const _: () = assert!(LOOP_WAIT_S + 2 * RETRY_TIMEOUT_S <= TTL_S);

/// The database and the role the API instances use.
pub const DATABASE: &str = "faafo";
pub const APP_USER: &str = "faafo";
/// The Patroni scope (cluster name) in etcd.
pub const SCOPE: &str = "faafo";

/// One postgres member's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Where PostgreSQL listens.
    pub postgres: SocketAddr,
    /// Where Patroni's REST API listens.
    pub rest: SocketAddr,
}

/// The passwords of a cluster, made once and kept (readable by the owner only) in the
/// cluster directory, so a cluster started again on the same data uses the same ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Secrets {
    pub superuser: String,
    pub replication: String,
    pub rewind: String,
    pub app: String,
}

impl Secrets {
    pub fn load_or_make(path: &Path) -> anyhow::Result<Secrets> {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text)
                .with_context(|| format!("reading the cluster's passwords in {}", path.display()));
        }
        let password = || uuid::Uuid::new_v4().simple().to_string();
        let secrets = Secrets {
            superuser: password(),
            replication: password(),
            rewind: password(),
            app: password(),
        };
        write_private(path, &serde_json::to_string_pretty(&secrets)?)?;
        Ok(secrets)
    }
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// Where the newest PostgreSQL server binaries are: `FAAFO_PG_BIN`, or Debian's
/// `/usr/lib/postgresql/VERSION/bin`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FAAFO_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The member's directory layout: its Patroni configuration, PostgreSQL's data
/// directory and socket directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn config(&self) -> PathBuf {
        self.dir.join("patroni.yml")
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The certificate chain PostgreSQL serves, with [`Tls`].
    pub fn certificate(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn private_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// Copies the certificate and key of `tls` into the member's directory, where the
    /// postgres user will own them: PostgreSQL reads a key only its owner can read.
    pub fn install_certificate(&self, tls: &Tls) -> anyhow::Result<()> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        write_private(&self.certificate(), &read(&tls.certificate)?)?;
        write_private(&self.private_key(), &read(&tls.key)?)
    }

    /// The pid of the running postmaster, from the first line of `postmaster.pid`: only
    /// while that process is this member's PostgreSQL (the file outlives a killed server,
    /// and its pid may have been reused).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&command_line)
            .contains(&*self.data().to_string_lossy())
            .then_some(pid)
    }
}

/// Patroni's configuration for member `me` (JSON, which is YAML too). With `tls`,
/// PostgreSQL serves the certificate installed in `layout` and takes TCP connections
/// only over TLS (the members' replication connections included: libpq's default
/// `sslmode=prefer` encrypts them).
pub fn patroni_config(
    me: &Node,
    etcd: &[etcd::Peer],
    layout: &Layout,
    bin_dir: &Path,
    secrets: &Secrets,
    tls: Option<&Tls>,
) -> Value {
    let etcd_hosts: Vec<String> = etcd.iter().map(|p| p.client.to_string()).collect();
    let mut parameters = json!({ "unix_socket_directories": layout.dir });
    let host = if tls.is_some() {
        parameters["ssl"] = json!("on");
        parameters["ssl_cert_file"] = json!(layout.certificate());
        parameters["ssl_key_file"] = json!(layout.private_key());
        "hostssl"
    } else {
        "host"
    };
    json!({
        "scope": SCOPE,
        "namespace": "/faafo/",
        "name": me.name,
        "log": { "level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s" },
        "restapi": {
            "listen": me.rest.to_string(),
            "connect_address": me.rest.to_string(),
        },
        "etcd3": { "hosts": etcd_hosts },
        "bootstrap": {
            "dcs": {
                "ttl": TTL_S,
                "loop_wait": LOOP_WAIT_S,
                "retry_timeout": RETRY_TIMEOUT_S,
                "maximum_lag_on_failover": 1_048_576,
                // A commit returns only once a standby has it, and only that standby may be
                // promoted: a failover loses no acknowledged write.
                "synchronous_mode": true,
                // Never without a synchronous standby: when Patroni cannot name one (it
                // was seen to fail to reassign it for minutes), commits wait (faafo
                // answers 503) rather than be acknowledged on the leader alone, where a
                // failover would lose them.
                "synchronous_mode_strict": true,
                "postgresql": {
                    // An old leader rejoins as a replica by rewinding what it had that the
                    // new one has not.
                    "use_pg_rewind": true,
                    // No replication slots: a new leader makes its standbys' slots only
                    // two loops after its promotion, and until then (2 s, seen here) no
                    // standby could connect and every commit waited. wal_keep_size keeps
                    // the WAL a standby that was away needs instead.
                    "use_slots": false,
                    "parameters": {
                        "wal_log_hints": "on",
                        "max_connections": 200,
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "wal_keep_size": "1GB",
                        // After a failover a standby's first try at the new leader fails
                        // (its replication slot is made on the leader's next loop), and
                        // with the default of 5 s the next try came 5 s later while every
                        // commit waited for it (strict synchronous mode).
                        "wal_retrieve_retry_interval": "250ms",
                    },
                },
            },
            "initdb": [{ "encoding": "UTF8" }, "data-checksums"],
        },
        "postgresql": {
            "listen": me.postgres.to_string(),
            "connect_address": me.postgres.to_string(),
            "data_dir": layout.data(),
            "bin_dir": bin_dir,
            "pgpass": layout.dir.join("pgpass"),
            // An old leader whose rewind fails, or whose timeline diverged past rewinding,
            // is cloned again from the leader rather than left down for a person to fix:
            // what it alone had was never acknowledged (synchronous replication).
            "remove_data_directory_on_rewind_failure": true,
            "remove_data_directory_on_diverged_timelines": true,
            // A new replica's pg_basebackup waits for a checkpoint on the leader: ask for
            // an immediate one, or it waits for the next spread checkpoint (a replica took
            // 91 s to clone an almost empty database here).
            "basebackup": { "checkpoint": "fast" },
            "authentication": {
                "superuser": { "username": "postgres", "password": secrets.superuser },
                "replication": { "username": "replicator", "password": secrets.replication },
                "rewind": { "username": "rewinder", "password": secrets.rewind },
            },
            "parameters": parameters,
            "pg_hba": [
                "local all all trust",
                format!("{host} replication replicator all scram-sha-256"),
                format!("{host} all all all scram-sha-256"),
            ],
        },
        "tags": { "nofailover": false, "noloadbalance": false, "clonefrom": false, "nosync": false },
    })
}

/// One member as Patroni's `GET /cluster` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterMember {
    pub name: String,
    /// `leader`, `sync_standby` or `replica`.
    pub role: String,
    /// `running`, `starting`, `stopped`, `crashed`, ...
    pub state: String,
    #[serde(default)]
    pub lag: Option<Value>,
}

impl ClusterMember {
    /// Whether its PostgreSQL runs (Patroni says `streaming` for a replica that
    /// replicates, in the versions that distinguish it).
    pub fn is_running(&self) -> bool {
        self.state == "running" || self.state == "streaming"
    }
}

#[derive(Debug, Deserialize)]
struct ClusterView {
    members: Vec<ClusterMember>,
}

/// The cluster as the Patroni at `rest` sees it.
pub async fn cluster(
    http: &reqwest::Client,
    rest: SocketAddr,
) -> anyhow::Result<Vec<ClusterMember>> {
    let view: ClusterView = http
        .get(format!("http://{rest}/cluster"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(view.members)
}

/// The member's health: its role first (`leader`, `sync_standby`, `replica` with its
/// replication lag), as its own Patroni sees the cluster; ready once PostgreSQL runs.
pub async fn health(http: &reqwest::Client, node: &Node) -> Health {
    let members = match cluster(http, node.rest).await {
        Ok(members) => members,
        Err(_) => return Health::not("down: Patroni does not answer"),
    };
    let Some(me) = members.into_iter().find(|m| m.name == node.name) else {
        return Health::not("down: not registered in etcd yet");
    };
    describe(&me)
}

/// What [`health`] says of one member.
pub fn describe(member: &ClusterMember) -> Health {
    if !member.is_running() {
        return Health::not(format!("down: {} ({})", member.state, member.role));
    }
    match (&*member.role, &member.lag) {
        ("leader", _) => Health::ready("leader"),
        (role, Some(Value::Number(bytes))) => Health::ready(format!("{role}, lag {bytes} B")),
        (role, Some(Value::String(lag))) => Health::ready(format!("{role}, lag {lag}")),
        (role, _) => Health::ready(role.to_owned()),
    }
}

/// Creates the role and the database faafo uses, if they are missing, on the leader.
pub async fn ensure_database(
    nodes: &[Node],
    secrets: &Secrets,
    tls: Option<&Tls>,
    wait: Duration,
) -> anyhow::Result<()> {
    let fence = faafo_store::patroni::PatroniFence::start(
        nodes.iter().map(|n| format!("http://{}", n.rest)).collect(),
    )
    .map_err(anyhow::Error::msg)?;
    let (host, port) = match fence.confirmed(wait).await {
        faafo_store::patroni::Leader::Confirmed { host, port, .. } => (host, port),
        faafo_store::patroni::Leader::Unknown(reason) => {
            anyhow::bail!("PostgreSQL did not elect a leader within {wait:?}: {reason}")
        }
    };
    // The password is a uuid: nothing in it needs escaping in a URL.
    let url = format!(
        "postgres://postgres:{}@{}/postgres?connect_timeout=5{}",
        secrets.superuser,
        match host.parse() {
            Ok(ip) => SocketAddr::new(ip, port).to_string(),
            Err(_) => format!("{host}:{port}"),
        },
        if tls.is_some() {
            "&sslmode=verify-full"
        } else {
            ""
        }
    );
    let (config, connector) =
        faafo_store::postgres_tls::parse_url(&url, tls.and_then(|t| t.ca_pem.as_deref()))?;
    let (client, connection) = config
        .connect(connector)
        .await
        .with_context(|| format!("connecting to the leader at {host}:{port}"))?;
    let driver = tokio::spawn(connection);
    let exists = |sql: &'static str| {
        let client = &client;
        async move { anyhow::Ok(!client.query(sql, &[]).await?.is_empty()) }
    };
    if !exists("SELECT 1 FROM pg_roles WHERE rolname = 'faafo'").await? {
        // The password is ours (a uuid): nothing in it needs quoting beyond the quotes.
        client
            .batch_execute(&format!(
                "CREATE ROLE {APP_USER} LOGIN PASSWORD '{}'",
                secrets.app
            ))
            .await
            .context("creating the faafo role")?;
    }
    if !exists("SELECT 1 FROM pg_database WHERE datname = 'faafo'").await? {
        client
            .batch_execute(&format!("CREATE DATABASE {DATABASE} OWNER {APP_USER}"))
            .await
            .context("creating the faafo database")?;
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// The URL the API instances use: every member's PostgreSQL (the fence picks the leader),
/// with `tls`, verified as the member it claims to be (the API's `--ca-cert` and the
/// system's roots are trusted).
pub fn database_url(nodes: &[Node], secrets: &Secrets, tls: Option<&Tls>) -> String {
    let hosts: Vec<String> = nodes.iter().map(|n| n.postgres.to_string()).collect();
    format!(
        "postgres://{APP_USER}:{}@{}/{DATABASE}?target_session_attrs=read-write{}",
        secrets.app,
        hosts.join(","),
        if tls.is_some() {
            "&sslmode=verify-full"
        } else {
            ""
        }
    )
}

/// Asks Patroni for a planned switchover from `leader` to `candidate`.
pub async fn switchover(
    http: &reqwest::Client,
    via: SocketAddr,
    leader: &str,
    candidate: &str,
) -> anyhow::Result<()> {
    let response = http
        .post(format!("http://{via}/switchover"))
        .timeout(Duration::from_secs(30))
        .json(&json!({ "leader": leader, "candidate": candidate }))
        .send()
        .await
        .context("asking Patroni for a switchover")?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "Patroni refused the switchover from {leader} to {candidate}: {status} {body}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<Node> {
        (1..=3)
            .map(|i| Node {
                name: format!("postgres-{i}"),
                postgres: format!("127.0.0.1:{}", 9410 + i).parse().unwrap(),
                rest: format!("127.0.0.1:{}", 9510 + i).parse().unwrap(),
            })
            .collect()
    }

    fn secrets() -> Secrets {
        Secrets {
            superuser: "S".into(),
            replication: "R".into(),
            rewind: "W".into(),
            app: "A".into(),
        }
    }

    #[test]
    fn patroni_configuration() {
        let etcd: Vec<etcd::Peer> = (1..=3)
            .map(|i| etcd::Peer {
                name: format!("etcd-{i}"),
                client: format!("127.0.0.1:{}", 9310 + i).parse().unwrap(),
                peer: format!("127.0.0.1:{}", 9320 + i).parse().unwrap(),
            })
            .collect();
        let layout = Layout {
            dir: "/data/cluster/postgres-2".into(),
        };
        let config = patroni_config(
            &nodes()[1],
            &etcd,
            &layout,
            Path::new("/usr/lib/postgresql/15/bin"),
            &secrets(),
            None,
        );
        insta::assert_snapshot!(serde_json::to_string_pretty(&config).unwrap());
    }

    #[test]
    fn with_tls_postgresql_serves_the_installed_certificate_and_takes_only_tls() {
        let layout = Layout {
            dir: "/data/cluster/postgres-1".into(),
        };
        let tls = Tls {
            certificate: "/etc/faafo/tls.pem".into(),
            key: "/etc/faafo/tls.key".into(),
            ca_cert: None,
            ca_pem: None,
        };
        let bin = Path::new("/usr/lib/postgresql/15/bin");
        let config = patroni_config(&nodes()[0], &[], &layout, bin, &secrets(), Some(&tls));
        let postgresql = &config["postgresql"];
        assert_eq!(postgresql["parameters"]["ssl"], "on");
        assert_eq!(
            postgresql["parameters"]["ssl_key_file"],
            "/data/cluster/postgres-1/server.key"
        );
        let hba: Vec<&str> = postgresql["pg_hba"]
            .as_array()
            .unwrap()
            .iter()
            .map(|line| line.as_str().unwrap())
            .collect();
        assert!(
            hba.iter()
                .all(|line| line.starts_with("local ") || line.starts_with("hostssl ")),
            "{hba:?}"
        );
        assert!(database_url(&nodes(), &secrets(), Some(&tls)).ends_with("&sslmode=verify-full"));
    }

    #[test]
    fn the_api_url_lists_every_member() {
        assert_eq!(
            database_url(&nodes(), &secrets(), None),
            "postgres://faafo:A@127.0.0.1:9411,127.0.0.1:9412,127.0.0.1:9413/faafo?target_session_attrs=read-write"
        );
    }

    #[test]
    fn health_names_the_role_first() {
        let member = |role: &str, state: &str, lag: Option<Value>| ClusterMember {
            name: "postgres-1".into(),
            role: role.into(),
            state: state.into(),
            lag,
        };
        let leader = describe(&member("leader", "running", None));
        assert!(leader.ready && leader.text == "leader");
        let sync = describe(&member("sync_standby", "streaming", Some(json!(0))));
        assert!(
            sync.ready && sync.text == "sync_standby, lag 0 B",
            "{}",
            sync.text
        );
        let replica = describe(&member("replica", "running", Some(json!("unknown"))));
        assert_eq!(replica.text, "replica, lag unknown");
        let starting = describe(&member("replica", "starting", None));
        assert!(!starting.ready && starting.text.starts_with("down: starting"));
    }
}
