//! faafo on three hosts, each a network namespace (`faafo_testkit::Hosts`) with an
//! address of its own. Every host runs what a host of a production deployment runs: an
//! etcd member, a Patroni member with its PostgreSQL, a Swift storage node with its rsync
//! daemon and an S3 proxy, and `faafo api`, `faafo worker` and `faafo gateway` started
//! with the flags a systemd unit gives them. Every address is another host's, never
//! 127.0.0.1; faafo's tiers speak HTTPS and PostgreSQL takes only TLS, with certificates
//! from the test's own CA.
//! Clients run outside the hosts and know the three gateways.
//!
//! Skipped, saying why, only where network namespaces cannot be made (not root).

mod common;

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TOKEN;
use common::load::{LoadRun, assert_listed_once, assert_rendered};
use faafo_cluster::members::{Programs, Tls, etcd, postgres, swift};
use faafo_testkit::{Host, Hosts, SwiftCluster, TestCa};
use uuid::Uuid;

// Every host listens on the ports its programs use by default: hosts do not share ports.
const ETCD_CLIENT: u16 = 2379;
const ETCD_PEER: u16 = 2380;
const POSTGRES: u16 = 5432;
const PATRONI: u16 = 8008;
const SWIFT_OBJECT: u16 = 6200;
const SWIFT_CONTAINER: u16 = 6201;
const SWIFT_ACCOUNT: u16 = 6202;
const RSYNC: u16 = 873;
const S3: u16 = 8090;
const API: u16 = 8081;
const GATEWAY: u16 = 8080;

/// The three-host deployment, and the processes each host runs now.
struct Deployment {
    hosts: Hosts,
    dir: tempfile::TempDir,
    programs: Programs,
    etcd: Vec<etcd::Peer>,
    postgres: Vec<postgres::Node>,
    swift: Vec<swift::StorageNode>,
    secrets: postgres::Secrets,
    running: Vec<Vec<(String, Child)>>,
    /// The deployment's CA (PEM), which signed every host's certificate.
    ca: String,
    /// Trusts the CA.
    http: reqwest::Client,
}

fn at(host: &Host, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(host.address), port)
}

impl Deployment {
    /// Writes every host's configuration; says which programs are missing.
    fn create(hosts: Hosts) -> Result<Deployment, String> {
        let programs = Programs::find().map_err(|e| e.to_string())?;
        faafo_cluster::members::check_swift().map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("faafo-hosts")
            .tempdir()
            .expect("temporary directory");
        let etcd: Vec<etcd::Peer> = hosts
            .hosts
            .iter()
            .enumerate()
            .map(|(i, host)| etcd::Peer {
                name: format!("etcd-{}", i + 1),
                client: at(host, ETCD_CLIENT),
                peer: at(host, ETCD_PEER),
            })
            .collect();
        let postgres: Vec<postgres::Node> = hosts
            .hosts
            .iter()
            .enumerate()
            .map(|(i, host)| postgres::Node {
                name: format!("postgres-{}", i + 1),
                postgres: at(host, POSTGRES),
                rest: at(host, PATRONI),
            })
            .collect();
        let swift: Vec<swift::StorageNode> = hosts
            .hosts
            .iter()
            .enumerate()
            .map(|(i, host)| swift::StorageNode {
                name: format!("swift-{}", i + 1),
                zone: i as u32 + 1,
                account: at(host, SWIFT_ACCOUNT),
                container: at(host, SWIFT_CONTAINER),
                object: at(host, SWIFT_OBJECT),
            })
            .collect();
        let secrets =
            postgres::Secrets::load_or_make(&dir.path().join("secrets.json")).expect("passwords");
        let ca = write_certificates(&hosts, dir.path());
        let roots = reqwest::Certificate::from_pem_bundle(ca.as_bytes()).unwrap();
        let deployment = Deployment {
            running: hosts.hosts.iter().map(|_| Vec::new()).collect(),
            hosts,
            dir,
            programs,
            etcd,
            postgres,
            swift,
            secrets,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .tls_certs_merge(roots)
                .build()
                .unwrap(),
            ca,
        };
        deployment.write_configurations();
        Ok(deployment)
    }

    fn host_dir(&self, index: usize) -> PathBuf {
        self.dir.path().join(&self.hosts.get(index).name)
    }

    fn swift_layout(&self, index: usize) -> swift::SwiftLayout {
        swift::SwiftLayout {
            root: self.host_dir(index).join("swift"),
        }
    }

    /// Host `index`'s certificate, which its PostgreSQL serves too, and the CA.
    fn database_tls(&self, index: usize) -> Tls {
        let etc = self.host_dir(index).join("etc/faafo");
        Tls {
            certificate: etc.join("tls.pem"),
            key: etc.join("tls.key"),
            ca_cert: Some(self.dir.path().join("ca.pem")),
            ca_pem: Some(self.ca.clone().into_bytes()),
        }
    }

    fn patroni_layout(&self, index: usize) -> postgres::Layout {
        postgres::Layout {
            dir: self.host_dir(index).join("postgres"),
        }
    }

    /// Each host's own files, as an operator would install them: its Patroni
    /// configuration, its Swift servers' and proxy's, its rsync modules, and the rings,
    /// built once and copied to every host.
    fn write_configurations(&self) {
        let hash = format!("{:x}", std::process::id());
        for (index, host) in self.hosts.hosts.iter().enumerate() {
            let layout = self.swift_layout(index);
            swift::write_configs(
                &layout,
                &self.swift[index..=index],
                &[("proxy".into(), at(host, S3))],
                at(host, RSYNC),
                &hash,
            )
            .expect("Swift configuration");
            let patroni = self.patroni_layout(index);
            std::fs::create_dir_all(&patroni.dir).unwrap();
            let tls = self.database_tls(index);
            patroni.install_certificate(&tls).unwrap();
            let config = postgres::patroni_config(
                &self.postgres[index],
                &self.etcd,
                &patroni,
                &self.programs.postgres_bin,
                &self.secrets,
                Some(&tls),
            );
            postgres::write_private(
                &patroni.config(),
                &serde_json::to_string_pretty(&config).unwrap(),
            )
            .unwrap();
        }
        let first = self.swift_layout(0);
        swift::build_rings(&first, &self.swift).expect("Swift rings");
        for index in 1..self.hosts.hosts.len() {
            for ring in ["account", "container", "object"] {
                let file = format!("{ring}.ring.gz");
                std::fs::copy(
                    first.swift_dir().join(&file),
                    self.swift_layout(index).swift_dir().join(&file),
                )
                .unwrap();
            }
        }
    }

    /// The gateways, over HTTPS.
    fn gateways(&self) -> String {
        self.urls("https", GATEWAY)
    }

    /// Every host's address, comma-separated.
    fn addresses(&self) -> String {
        let addresses: Vec<String> = self
            .hosts
            .hosts
            .iter()
            .map(|host| host.address.to_string())
            .collect();
        addresses.join(",")
    }

    fn urls(&self, scheme: &str, port: u16) -> String {
        let urls: Vec<String> = self
            .hosts
            .hosts
            .iter()
            .map(|host| format!("{scheme}://{}", at(host, port)))
            .collect();
        urls.join(",")
    }

    /// Starts `program ARGS` on host `index`, logging to the host's directory.
    fn spawn(&mut self, index: usize, name: &str, mut command: Command) {
        // Appended to, as a host's logs are: a reboot keeps what came before it.
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.host_dir(index).join(format!("{name}.log")))
            .unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts on host {}: {e}", index + 1));
        self.running[index].push((name.to_owned(), child));
    }

    fn start_etcd(&mut self, index: usize) {
        let host = self.hosts.get(index).clone();
        let mut command = host.command(&self.programs.etcd);
        command.args(etcd::arguments(
            &self.etcd[index],
            &self.etcd,
            &self.host_dir(index).join("etcd"),
        ));
        self.spawn(index, "etcd", command);
    }

    fn start_patroni(&mut self, index: usize) {
        let host = self.hosts.get(index).clone();
        let layout = self.patroni_layout(index);
        // Patroni and PostgreSQL run as `postgres`; setpriv switches to it inside the
        // host and execs, so the pid stays Patroni's.
        let owner = faafo_cluster::server_user::hand_to_server_user(&layout.dir).unwrap();
        let mut command = match owner {
            Some((uid, gid)) => {
                let mut command = host.command("setpriv");
                command.args([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                ]);
                command.arg(&self.programs.patroni);
                command
            }
            None => host.command(&self.programs.patroni),
        };
        command.arg(layout.config()).env("HOME", &layout.dir);
        self.spawn(index, "patroni", command);
    }

    fn start_swift(&mut self, index: usize) {
        let host = self.hosts.get(index).clone();
        let layout = self.swift_layout(index);
        let mut rsync = host.command("rsync");
        rsync
            .args(["--daemon", "--no-detach", "--config"])
            .arg(layout.rsync_config());
        self.spawn(index, "rsync", rsync);
        for (program, config) in swift::node_programs(&layout, &self.swift[index].name) {
            let mut command = host.command(&program);
            command.arg(config).arg("-v");
            self.spawn(index, &program, command);
        }
        let mut proxy = host.command("swift-proxy-server");
        proxy.arg(layout.proxy_config("proxy")).arg("-v");
        self.spawn(index, "swift-proxy-server", proxy);
    }

    /// `faafo api`, `faafo worker` and `faafo gateway` as the units of `deploy/systemd`
    /// start them, with the environment files an operator writes for this host.
    fn start_faafo(&mut self, index: usize) {
        let host = self.hosts.get(index).clone();
        let etc = self.host_dir(index).join("etc/faafo");
        std::fs::create_dir_all(&etc).unwrap();
        let [(key_id, key_id_value), (secret, secret_value)] = SwiftCluster::credentials();
        let files: [(&str, Vec<(&str, String)>); 4] = [
            (
                "faafo.env",
                vec![
                    ("FAAFO_WORKER_TOKEN", TOKEN.into()),
                    ("RUST_LOG", "info".into()),
                    (
                        "FAAFO_CA_CERT",
                        self.dir.path().join("ca.pem").display().to_string(),
                    ),
                    ("FAAFO_TLS_CERT", etc.join("tls.pem").display().to_string()),
                    ("FAAFO_TLS_KEY", etc.join("tls.key").display().to_string()),
                ],
            ),
            (
                "api.env",
                vec![
                    ("FAAFO_BIND", at(&host, API).to_string()),
                    (
                        "FAAFO_DATABASE_URL",
                        postgres::database_url(
                            &self.postgres,
                            &self.secrets,
                            Some(&self.database_tls(index)),
                        ),
                    ),
                    ("FAAFO_PATRONI", self.urls("http", PATRONI)),
                    // The gateways are on the other hosts: their X-Forwarded-For names clients.
                    ("FAAFO_TRUSTED_PROXIES", self.addresses()),
                    (
                        "FAAFO_OBJECT_STORE",
                        swift::object_store_url("faafo", at(&host, S3)),
                    ),
                    ("FAAFO_LEASE_MS", "3000".into()),
                    (key_id, key_id_value.into()),
                    (secret, secret_value.into()),
                ],
            ),
            (
                "worker.env",
                vec![
                    ("FAAFO_ENDPOINT_URL", self.gateways()),
                    ("FAAFO_WORKER_NAME", format!("worker-{}", index + 1)),
                ],
            ),
            (
                "gateway.env",
                vec![
                    ("FAAFO_GATEWAY_BIND", at(&host, GATEWAY).to_string()),
                    ("FAAFO_GATEWAY_BACKENDS", self.urls("https", API)),
                ],
            ),
        ];
        for (file, variables) in files {
            let text: String = variables
                .iter()
                .map(|(key, value)| format!("{key}={value}\n"))
                .collect();
            postgres::write_private(&etc.join(file), &text).unwrap();
        }
        for role in ["api", "worker", "gateway"] {
            let unit = format!("faafo-{role}");
            let command = unit_command(&host, &unit, &etc);
            self.spawn(index, &unit, command);
        }
    }

    /// Brings the whole deployment up, tier by tier, as a first installation would.
    async fn start(&mut self) {
        let started = Instant::now();
        let all = 0..self.hosts.hosts.len();
        for index in all.clone() {
            self.start_etcd(index);
        }
        for index in all.clone() {
            self.start_patroni(index);
        }
        let tls = self.database_tls(0);
        postgres::ensure_database(
            &self.postgres,
            &self.secrets,
            Some(&tls),
            Duration::from_secs(120),
        )
        .await
        .unwrap_or_else(|e| panic!("no database: {e:#}\n{}", self.logs()));
        for index in all.clone() {
            self.start_swift(index);
        }
        for index in all.clone() {
            self.await_swift(index).await;
        }
        for index in all.clone() {
            self.start_faafo(index);
        }
        for index in all {
            self.await_ready(index).await;
        }
        println!("3 hosts up in {:.1} s", started.elapsed().as_secs_f64());
    }

    /// Starts everything a host runs, as when it boots again.
    async fn boot(&mut self, index: usize) {
        self.start_etcd(index);
        self.start_patroni(index);
        self.start_swift(index);
        self.await_swift(index).await;
        self.start_faafo(index);
        self.await_ready(index).await;
    }

    /// Waits until the host's Swift servers and its S3 proxy answer their health checks
    /// (`faafo api` refuses to start on an object store it cannot write to).
    async fn await_swift(&self, index: usize) {
        let host = self.hosts.get(index);
        let node = &self.swift[index];
        let servers = [node.account, node.container, node.object, at(host, S3)];
        let deadline = Instant::now() + Duration::from_secs(60);
        for address in servers {
            while !swift::healthy(&self.http, address).await {
                assert!(
                    Instant::now() < deadline,
                    "Swift at {address} not healthy\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Waits until the host's gateway and API are ready and its Patroni member runs.
    async fn await_ready(&self, index: usize) {
        let host = self.hosts.get(index);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (gateway, api) = (
                format!("https://{}/readyz", at(host, GATEWAY)),
                format!("https://{}/readyz", at(host, API)),
            );
            let (gateway, api) = (self.answers(&gateway), self.answers(&api));
            let member = postgres::health(&self.http, &self.postgres[index]);
            let (gateway, api, member) = tokio::join!(gateway, api, member);
            if gateway && api && member.ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready (gateway {gateway}, api {api}, postgres {member:?})\n{}",
                host.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn answers(&self, url: &str) -> bool {
        matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// etcd's raft term as host `index`'s member reports it: it grows with every etcd
    /// election.
    async fn etcd_term(&self, index: usize) -> u64 {
        #[derive(serde::Deserialize)]
        struct Status {
            header: Header,
        }
        #[derive(serde::Deserialize)]
        struct Header {
            raft_term: String,
        }
        let url = format!("http://{}/v3/maintenance/status", self.etcd[index].client);
        let status: Status = self
            .http
            .post(&url)
            .body("{}")
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        status.header.raft_term.parse().expect("a raft term")
    }

    /// The index of the host whose Patroni member leads.
    async fn leader(&self) -> usize {
        common::wait_for("a Patroni leader", Duration::from_secs(60), || async {
            for node in &self.postgres {
                if let Ok(members) = postgres::cluster(&self.http, node.rest).await {
                    let leader = members.iter().find(|m| m.role == "leader")?;
                    return self.postgres.iter().position(|n| n.name == leader.name);
                }
            }
            None
        })
        .await
    }

    /// Waits until every Patroni member runs and every replica could take over (its lag
    /// known and within `maximum_lag_on_failover`), as an operator does before taking the
    /// next host down in a rolling restart: a member cut off earlier may still need
    /// pg_rewind, and restarting the leader meanwhile leaves nobody fit to follow it.
    async fn replicating(&self) {
        let members = self.postgres.len();
        common::wait_for(
            "every Patroni member to replicate",
            Duration::from_secs(180),
            || async {
                for node in &self.postgres {
                    let Ok(view) = postgres::cluster(&self.http, node.rest).await else {
                        continue;
                    };
                    let fit = view.len() == members
                        && view.iter().filter(|m| m.role == "leader").count() == 1
                        && view.iter().all(|m| {
                            m.is_running()
                                && (m.role == "leader"
                                    || m.lag
                                        .as_ref()
                                        .and_then(|lag| lag.as_u64())
                                        .is_some_and(|bytes| bytes <= 1_048_576))
                        });
                    return fit.then_some(());
                }
                None
            },
        )
        .await
    }

    /// The index of a host other than `old` whose Patroni member leads, as the hosts
    /// still reachable see it.
    async fn leader_other_than(&self, old: usize) -> usize {
        common::wait_for(
            "another Patroni leader",
            Duration::from_secs(60),
            || async {
                for (index, node) in self.postgres.iter().enumerate() {
                    if index == old {
                        continue;
                    }
                    if let Ok(members) = postgres::cluster(&self.http, node.rest).await {
                        let leader = members.iter().find(|m| m.role == "leader")?;
                        return self
                            .postgres
                            .iter()
                            .position(|n| n.name == leader.name)
                            .filter(|&leader| leader != old);
                    }
                }
                None
            },
        )
        .await
    }

    /// Waits until the cut-off host takes no write: seen from inside it, its PostgreSQL
    /// is a standby or down, and its API refuses a create with 503.
    async fn await_fenced(&self, index: usize) {
        let host = self.hosts.get(index).clone();
        let api = format!("https://{}/v1/fractal", at(&host, API));
        let roots = reqwest::Certificate::from_pem_bundle(self.ca.as_bytes()).unwrap();
        // Over TLS, verified: the members take nothing else over TCP.
        let database = format!(
            "postgres://{}:{}@{}/faafo?connect_timeout=2&sslmode=verify-full",
            postgres::APP_USER,
            self.secrets.app,
            at(&host, POSTGRES),
        );
        let (database, connector) =
            faafo_store::postgres_tls::parse_url(&database, Some(self.ca.as_bytes())).unwrap();
        let body = serde_json::to_string(&common::small_fractal()).unwrap();
        let fenced = host.within(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .tls_certs_merge(roots)
                    .build()
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let writable = match database.connect(connector.clone()).await {
                        Ok((client, connection)) => {
                            tokio::spawn(connection);
                            let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await;
                            matches!(row, Ok(row) if !row.get::<_, bool>(0))
                        }
                        Err(_) => false,
                    };
                    let created = http
                        .post(&api)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .map(|r| r.status().as_u16());
                    if !writable && created.as_ref().is_ok_and(|status| *status == 503) {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "PostgreSQL writable: {writable}; create: {created:?}"
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        });
        if let Err(state) = fenced {
            panic!(
                "{} still takes writes while cut off: {state}\n{}",
                host.name,
                self.logs()
            );
        }
    }

    /// Stops everything on host `index` as a reboot would (SIGTERM, last started first,
    /// each given 30 s to finish), then boots it again.
    async fn restart(&mut self, index: usize) {
        for (name, child) in self.running[index].iter_mut().rev() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "{name} ignored SIGTERM for 30 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.crash(index);
        self.boot(index).await;
    }

    /// Every process of host `index` killed at once, as when it loses power.
    fn crash(&mut self, index: usize) {
        self.hosts.get(index).crash();
        for (_, child) in &mut self.running[index] {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.running[index].clear();
    }

    /// Copies every host's logs whole under the target directory, where they outlive the
    /// failed run.
    fn keep_logs(&self) {
        let kept = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("multi-host-logs")
            .join(std::process::id().to_string());
        for index in 0..self.hosts.hosts.len() {
            let into = kept.join(&self.hosts.get(index).name);
            let _ = std::fs::create_dir_all(&into);
            let logs = std::fs::read_dir(self.host_dir(index))
                .into_iter()
                .flatten();
            for entry in logs.flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let _ = std::fs::copy(entry.path(), into.join(entry.file_name()));
                }
            }
        }
        eprintln!("the hosts' logs are kept in {}", kept.display());
    }

    /// The last lines of every log, for a failure's message.
    fn logs(&self) -> String {
        let mut text = String::new();
        for index in 0..self.hosts.hosts.len() {
            for (name, _) in &self.running[index] {
                let path = self.host_dir(index).join(format!("{name}.log"));
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                text.push_str(&format!("--- host-{} {name}\n", index + 1));
                for line in tail.into_iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the hosts' logs:\n{}", self.logs());
            self.keep_logs();
        }
        for index in 0..self.hosts.hosts.len() {
            self.crash(index);
        }
    }
}

/// Makes the deployment's CA (`DIR/ca.pem`) and, for each host, a certificate for its
/// address signed by it (`DIR/HOST/etc/faafo/tls.pem` and `tls.key`), as an operator's PKI
/// would. Returns the CA's PEM.
fn write_certificates(hosts: &Hosts, dir: &Path) -> String {
    let ca = TestCa::new("faafo multi-host CA");
    for host in &hosts.hosts {
        let etc = dir.join(&host.name).join("etc/faafo");
        std::fs::create_dir_all(&etc).unwrap();
        let (certificate, key) = ca.issue(&[&host.address.to_string()]);
        std::fs::write(etc.join("tls.pem"), certificate).unwrap();
        postgres::write_private(&etc.join("tls.key"), &key).unwrap();
    }
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    ca.pem().to_owned()
}

/// What the systemd unit `deploy/systemd/UNIT.service` runs: its `ExecStart`, with the
/// test's faafo binary for `/usr/local/bin/faafo`, and the variables of its
/// `EnvironmentFile`s, read from `etc` rather than `/etc/faafo`.
fn unit_command(host: &Host, unit: &str, etc: &Path) -> Command {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/systemd")
        .join(format!("{unit}.service"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let setting = |key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|line| line.strip_prefix(key))
            .map(str::to_owned)
            .collect()
    };
    let exec_start = setting("ExecStart=");
    let mut words = exec_start[0].split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/faafo"), "{unit}");
    let mut command = host.command(env!("CARGO_BIN_EXE_faafo"));
    command.args(words);
    for file in setting("EnvironmentFile=") {
        let name = Path::new(&file).file_name().expect("a file name");
        let variables = std::fs::read_to_string(etc.join(name)).unwrap();
        for (key, value) in variables.lines().filter_map(|line| line.split_once('=')) {
            command.env(key, value);
        }
    }
    command
}

/// Makes the deployment, or returns `None` having said why this machine cannot make
/// hosts (network namespaces need root).
fn deployment() -> Option<Deployment> {
    let hosts = match Hosts::create(3) {
        Ok(hosts) => hosts,
        Err(reason) => {
            println!("SKIPPED: the multi-host tests need network namespaces: {reason}");
            return None;
        }
    };
    Some(Deployment::create(hosts).unwrap_or_else(|e| panic!("{e}")))
}

/// Prints and checks what a scenario did: every client operation succeeded after its
/// retries, every acknowledged create is done with an intact image, and the list holds
/// every fractal made so far (`everything`, which this scenario's join) exactly once.
async fn report(what: &str, load: LoadRun, unavailability: Duration, everything: &mut Vec<Uuid>) {
    let (client, created) = load.finish(what).await;
    let rerendered = assert_rendered(&client, &created).await;
    everything.extend(&created);
    assert_listed_once(&client, everything).await;
    println!(
        "{what}: write unavailability {:.1} s; lost 0 of {} acknowledged creates; {rerendered} re-rendered",
        unavailability.as_secs_f64(),
        created.len()
    );
}

/// One deployment for the binary (it takes a minute or two to start on 2 cores); the
/// scenarios run one after the other on it, each under its own load, each leaving every
/// host up and ready.
#[tokio::test(flavor = "multi_thread")]
async fn three_hosts_survive_a_crashed_host_an_isolated_host_and_a_rolling_restart() {
    let Some(mut deployment) = deployment() else {
        return;
    };
    deployment.start().await;
    let gateways = deployment.gateways();
    let mut everything = Vec::new();

    // Host crash: every process of the database leader's host killed at once; the host
    // boots again later.
    let load = LoadRun::start_with(&gateways, Duration::ZERO, Some(deployment.ca.as_bytes()));
    load.wait_for_creates(20).await;
    let leader = deployment.leader().await;
    let fault = Instant::now();
    deployment.crash(leader);
    let next = deployment.leader_other_than(leader).await;
    println!(
        "{} (the database leader's) crashed; {} took over",
        deployment.hosts.get(leader).name,
        deployment.hosts.get(next).name
    );
    load.wait_for_creates(30).await;
    let gap = load.load.write_gap(fault);
    deployment.boot(leader).await;
    load.wait_for_creates(20).await;
    report("host crash", load, gap, &mut everything).await;

    // Host isolation: the leader's host cut off while everything on it keeps running. Its
    // side stops taking writes (no split brain), the others elect a leader and carry on,
    // and when the link is back the host rejoins.
    let load = LoadRun::start_with(&gateways, Duration::ZERO, Some(deployment.ca.as_bytes()));
    load.wait_for_creates(20).await;
    let leader = deployment.leader().await;
    let fault = Instant::now();
    deployment.hosts.isolate(leader);
    let next = deployment.leader_other_than(leader).await;
    deployment.await_fenced(leader).await;
    println!(
        "{} (the database leader's) cut off and fenced; {} took over",
        deployment.hosts.get(leader).name,
        deployment.hosts.get(next).name
    );
    load.wait_for_creates(30).await;
    let gap = load.load.write_gap(fault);
    let term = deployment.etcd_term(next).await;
    deployment.hosts.heal(leader);
    deployment.await_ready(leader).await;
    load.wait_for_creates(20).await;
    // The host rejoined without deposing anyone. Without pre-vote, its etcd member comes
    // back with the term its lone elections raised and deposes etcd's leader; Patroni's
    // leader, without etcd meanwhile, may then demote itself.
    assert_eq!(
        deployment.etcd_term(next).await,
        term,
        "etcd held an election when the cut-off host came back"
    );
    assert_eq!(
        deployment.leader().await,
        next,
        "the leader changed again after the heal"
    );
    report("host isolation", load, gap, &mut everything).await;

    // Rolling restart of everything, host by host (seed 004: restart everything, often).
    let load = LoadRun::start_with(&gateways, Duration::ZERO, Some(deployment.ca.as_bytes()));
    load.wait_for_creates(20).await;
    let started = Instant::now();
    for index in 0..deployment.hosts.hosts.len() {
        deployment.replicating().await;
        let restarted = Instant::now();
        deployment.restart(index).await;
        println!(
            "{} restarted in {:.1} s",
            deployment.hosts.get(index).name,
            restarted.elapsed().as_secs_f64()
        );
        load.wait_for_creates(10).await;
    }
    let gap = load.load.write_gap(started);
    report("rolling restart of every host", load, gap, &mut everything).await;
}
