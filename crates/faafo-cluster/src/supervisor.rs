//! The supervisor of the local topology: it runs the data tier (etcd and Patroni-managed
//! PostgreSQL members) and gateways, API instances and workers (this same binary) as
//! child processes, restarts any that exit, and carries out the control requests
//! (status, stop, start, restart, rolling restart, scale, kill). What each kind of
//! member runs and how its health is read lives in [`crate::members`].
//!
//! Each member has a task that owns its process: it starts the process while the member
//! is wanted, restarts it when it exits (at once if it ran a while, with growing backoff
//! if it keeps failing at start), and stops it (SIGTERM, then SIGKILL after a grace
//! period) when it is no longer wanted. Everything else talks to those tasks through
//! two watch channels per member: what is wanted, and what is happening.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use faafo_core::NodeRole;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::autoscale::{self, Autoscaler, Range};
use crate::control::{MemberStatus, Replies, Reply, Request, progress};
use crate::members::{Health, Kind, Programs, Tls, Topology, etcd, faafo, postgres, swift};
use crate::{member_config, process_tree};

/// A process that exits sooner than this after starting failed to start: the next start
/// waits longer each time (like supervisord's `startsecs`).
const START_SECONDS: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a stopping member may take after SIGTERM (an API drains, a worker gives its
/// task back) before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// How long a started member may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most members of one role.
pub const MAX_PER_ROLE: u32 = 32;
/// Most postgres members (their ports are numbered from one base).
pub const MAX_POSTGRES: u32 = 9;
/// Most Swift storage nodes.
pub const MAX_SWIFT: u32 = 16;

/// What the supervisor needs to start members.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This binary.
    pub exe: PathBuf,
    /// Logs, the control socket and the pid list live here.
    pub dir: PathBuf,
    pub host: IpAddr,
    /// How the API instances reach the data (with the data tier: filled in by
    /// [`Supervisor::start`] once PostgreSQL runs).
    pub backing: faafo::Backing,
    pub worker_token: String,
    /// First port of each kind (0: any free port). A second port (etcd's peer port,
    /// Patroni's REST API) is the first plus [`SECOND_PORT_OFFSET`].
    pub gateway_port: u16,
    pub api_port: u16,
    pub etcd_port: u16,
    pub postgres_port: u16,
    /// Swift storage nodes' first port: account servers from it, container servers 100
    /// higher, object servers 200 higher, proxies 300 higher, the rsync daemon at +399.
    pub swift_port: u16,
    /// The data tier's programs and passwords, when it runs PostgreSQL.
    pub data_tier: Option<DataTier>,
    /// Where Swift's files live, when the cluster runs Swift.
    pub swift: Option<SwiftTier>,
    /// HTTPS between gateways, APIs and workers, and TLS to PostgreSQL.
    pub tls: Option<Tls>,
    /// The members' configuration file (`cluster up --config`), absolute.
    pub member_config: Option<PathBuf>,
}

/// What running Swift needs.
#[derive(Debug, Clone)]
pub struct SwiftTier {
    pub layout: swift::SwiftLayout,
    /// Places objects in the rings; made once, kept with the data.
    pub hash_suffix: String,
}

/// What running etcd and Patroni needs.
#[derive(Debug, Clone)]
pub struct DataTier {
    pub programs: Programs,
    pub secrets: postgres::Secrets,
}

/// A member's second port is its first plus this (etcd 9310 -> 9410).
pub const SECOND_PORT_OFFSET: u16 = 100;

/// What a member's process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Exited; waiting before the next start.
    Backoff,
    Stopping,
    Stopped,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Backoff => "backoff",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Default)]
struct Record {
    pid: Option<u32>,
    started: Option<Instant>,
    restarts: u32,
    last_exit: Option<String>,
}

#[derive(Debug)]
struct Member {
    name: String,
    kind: Kind,
    index: u32,
    /// Kept across restarts: members know each other by address. See
    /// [`Kind::port_count`].
    ports: Vec<u16>,
    wanted: watch::Sender<bool>,
    phase: watch::Sender<Phase>,
    record: Mutex<Record>,
    /// Cancelled when the member is scaled away: its task ends.
    retired: CancellationToken,
}

impl Member {
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }
}

#[derive(Debug)]
pub struct Supervisor {
    settings: Settings,
    /// In start order ([`Kind`]'s order), each kind by index.
    members: Mutex<Vec<Arc<Member>>>,
    http: reqwest::Client,
    /// For calls that take a while (a switchover).
    http_long: reqwest::Client,
    /// One topology change at a time, so that two rolling restarts cannot overlap.
    changing: tokio::sync::Mutex<()>,
    /// Cancelled by `down` (or a signal): the supervisor stops everything and exits.
    pub down: CancellationToken,
    /// Set when the workers follow the queue.
    autoscaler: Mutex<Option<Autoscaler>>,
}

/// The address members listening on `host` are reached at: loopback for every interface.
pub(crate) fn reachable(host: IpAddr) -> IpAddr {
    if host.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host
    }
}

impl Supervisor {
    pub fn new(settings: Settings) -> anyhow::Result<Arc<Supervisor>> {
        std::fs::create_dir_all(settings.dir.join("logs"))?;
        // Trusts what the members are given to trust, to read their health over HTTPS.
        let client = |timeout: Duration| -> anyhow::Result<reqwest::Client> {
            let mut builder = reqwest::Client::builder().timeout(timeout);
            if let Some(pem) = settings.tls.as_ref().and_then(|tls| tls.ca_pem.as_deref()) {
                builder = builder.tls_certs_merge(
                    reqwest::Certificate::from_pem_bundle(pem).context("--ca-cert")?,
                );
            }
            Ok(builder.build()?)
        };
        let http = client(Duration::from_secs(1))?;
        // For calls that take a while (a switchover).
        let http_long = client(Duration::from_secs(60))?;
        Ok(Arc::new(Supervisor {
            settings,
            members: Mutex::new(Vec::new()),
            http,
            http_long,
            changing: tokio::sync::Mutex::new(()),
            down: CancellationToken::new(),
            autoscaler: Mutex::new(None),
        }))
    }

    fn members(&self) -> Vec<Arc<Member>> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn of_kind(&self, kind: Kind) -> Vec<Arc<Member>> {
        self.members()
            .into_iter()
            .filter(|m| m.kind == kind)
            .collect()
    }

    fn reachable_host(&self) -> IpAddr {
        reachable(self.settings.host)
    }

    fn address(&self, member: &Member, port: usize) -> Option<SocketAddr> {
        member
            .ports
            .get(port)
            .map(|port| SocketAddr::new(self.reachable_host(), *port))
    }

    /// The URL this supervisor reaches a gateway or API at.
    fn url(&self, member: &Member) -> Option<String> {
        match member.kind {
            Kind::Gateway | Kind::Api => {
                let scheme = if self.settings.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                self.address(member, 0).map(|a| format!("{scheme}://{a}"))
            }
            _ => None,
        }
    }

    /// The address `cluster status` shows: the URL of a gateway or an API, etcd's client
    /// URL, a postgres member's PostgreSQL address and its Patroni REST API.
    fn display_address(&self, member: &Member) -> Option<String> {
        match member.kind {
            Kind::Etcd => self.address(member, 0).map(|a| format!("http://{a}")),
            Kind::Postgres => {
                let node = self.postgres_node(member)?;
                Some(format!("{} (http://{})", node.postgres, node.rest))
            }
            Kind::SwiftNode => {
                let ports: Vec<String> = member.ports.iter().map(u16::to_string).collect();
                Some(format!("{}:{}", self.reachable_host(), ports.join(",")))
            }
            Kind::SwiftProxy => self.address(member, 0).map(|a| format!("http://{a}")),
            Kind::SwiftRsync => self.address(member, 0).map(|a| format!("rsync://{a}")),
            Kind::Probe => self
                .address(member, 0)
                .map(|a| format!("http://{a}/metrics")),
            _ => self.url(member),
        }
    }

    pub fn gateway_urls(&self) -> Vec<String> {
        self.of_kind(Kind::Gateway)
            .iter()
            .filter_map(|m| self.url(m))
            .collect()
    }

    pub fn api_urls(&self) -> Vec<String> {
        self.of_kind(Kind::Api)
            .iter()
            .filter_map(|m| self.url(m))
            .collect()
    }

    /// Where every member is, as the members' configurations need it.
    fn topology(&self) -> Topology {
        let members = self.members();
        let with = |kind: Kind| members.iter().filter(move |m| m.kind == kind);
        Topology {
            host: self.settings.host,
            apis: self.api_urls(),
            gateways: self.gateway_urls(),
            etcd: with(Kind::Etcd)
                .filter_map(|m| {
                    Some(etcd::Peer {
                        name: m.name.clone(),
                        client: self.address(m, 0)?,
                        peer: self.address(m, 1)?,
                    })
                })
                .collect(),
            postgres: with(Kind::Postgres)
                .filter_map(|m| self.postgres_node(m))
                .collect(),
            swift_nodes: with(Kind::SwiftNode)
                .filter_map(|m| {
                    Some(swift::StorageNode {
                        name: m.name.clone(),
                        zone: m.index,
                        account: self.address(m, 0)?,
                        container: self.address(m, 1)?,
                        object: self.address(m, 2)?,
                    })
                })
                .collect(),
            swift_proxies: with(Kind::SwiftProxy)
                .filter_map(|m| Some((m.name.clone(), self.address(m, 0)?)))
                .collect(),
            swift_rsync: with(Kind::SwiftRsync).find_map(|m| self.address(m, 0)),
        }
    }

    fn postgres_node(&self, member: &Member) -> Option<postgres::Node> {
        Some(postgres::Node {
            name: member.name.clone(),
            postgres: self.address(member, 0)?,
            rest: self.address(member, 1)?,
        })
    }

    /// The first port of `kind`'s members (0: any free port).
    fn base_port(&self, kind: Kind) -> u16 {
        match kind {
            Kind::Gateway => self.settings.gateway_port,
            Kind::Api => self.settings.api_port,
            Kind::Etcd => self.settings.etcd_port,
            Kind::Postgres => self.settings.postgres_port,
            Kind::SwiftNode => self.settings.swift_port,
            Kind::SwiftProxy if self.settings.swift_port > 0 => self
                .settings
                .swift_port
                .saturating_add(3 * SECOND_PORT_OFFSET),
            Kind::SwiftRsync if self.settings.swift_port > 0 => self
                .settings
                .swift_port
                .saturating_add(4 * SECOND_PORT_OFFSET - 1),
            Kind::SwiftProxy | Kind::SwiftRsync | Kind::Worker | Kind::Probe => 0,
        }
    }

    /// Adds members of `kind` up to `count` and starts them; returns the new ones.
    fn grow(self: &Arc<Self>, kind: Kind, count: u32) -> anyhow::Result<Vec<Arc<Member>>> {
        self.add(kind, count, true)
    }

    /// Adds members of `kind` up to `count`, started at once if `wanted`; returns the new
    /// ones.
    fn add(
        self: &Arc<Self>,
        kind: Kind,
        count: u32,
        wanted: bool,
    ) -> anyhow::Result<Vec<Arc<Member>>> {
        let mut added = Vec::new();
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let taken: BTreeSet<u32> = members
            .iter()
            .filter(|m| m.kind == kind)
            .map(|m| m.index)
            .collect();
        let mut used_ports: BTreeSet<u16> = members
            .iter()
            .flat_map(|m| m.ports.iter().copied())
            .collect();
        let mut index = 1;
        while (taken.len() + added.len()) < count as usize {
            if taken.contains(&index) {
                index += 1;
                continue;
            }
            let mut ports = Vec::new();
            for which in 0..kind.port_count() {
                // The k-th port of each member is k * 100 above its first.
                let base = match self.base_port(kind) {
                    0 => 0,
                    base => base.saturating_add(SECOND_PORT_OFFSET * which as u16),
                };
                let port = self.port(base, index, &used_ports)?;
                used_ports.insert(port);
                ports.push(port);
            }
            let member = Arc::new(Member {
                name: format!("{kind}-{index}"),
                kind,
                index,
                ports,
                wanted: watch::Sender::new(wanted),
                phase: watch::Sender::new(Phase::Stopped),
                record: Mutex::new(Record::default()),
                retired: CancellationToken::new(),
            });
            members.push(Arc::clone(&member));
            added.push(member);
            index += 1;
        }
        members.sort_by_key(|m| (m.kind, m.index));
        drop(members);
        for member in &added {
            tokio::spawn(Arc::clone(self).supervise(Arc::clone(member)));
        }
        Ok(added)
    }

    /// The port of member `index`: `base + index - 1`, or a free one when `base` is 0.
    fn port(&self, base: u16, index: u32, used: &BTreeSet<u16>) -> anyhow::Result<u16> {
        if base == 0 {
            loop {
                let port = std::net::TcpListener::bind(SocketAddr::new(self.settings.host, 0))?
                    .local_addr()?
                    .port();
                if !used.contains(&port) {
                    return Ok(port);
                }
            }
        }
        let port = u32::from(base) + index - 1;
        u16::try_from(port).map_err(|_| anyhow::anyhow!("port {port} is out of range"))
    }

    /// Owns one member's process for as long as the member exists.
    async fn supervise(self: Arc<Self>, member: Arc<Member>) {
        let mut wanted = member.wanted.subscribe();
        let mut failures_in_row: u32 = 0;
        loop {
            tokio::select! {
                _ = member.retired.cancelled() => return,
                _ = wanted.wait_for(|w| *w) => {}
            }
            let mut children = match self.spawn(&member) {
                Ok(children) => children,
                Err(error) => {
                    tracing::error!(member = %member.name, %error, "cannot start");
                    member.record().last_exit = Some(format!("cannot start: {error}"));
                    failures_in_row += 1;
                    self.back_off(&member, &mut wanted, failures_in_row).await;
                    continue;
                }
            };
            let started = Instant::now();
            {
                let mut record = member.record();
                record.pid = children[0].id();
                record.started = Some(started);
            }
            member.phase.send_replace(Phase::Running);
            self.write_pid_list();
            let exited = tokio::select! {
                status = wait_any(&mut children) => Some(status),
                _ = wanted.wait_for(|w| !*w) => None,
            };
            match exited {
                Some(status) => {
                    // One program of a set died: the rest go with it, and all restart.
                    if children.len() > 1 {
                        stop(&mut children, Duration::ZERO).await;
                    }
                    let how = match status {
                        Ok(status) => describe_exit(status),
                        Err(error) => format!("lost track of it: {error}"),
                    };
                    tracing::warn!(member = %member.name, exit = %how, "member exited; restarting");
                    {
                        let mut record = member.record();
                        record.pid = None;
                        record.last_exit = Some(how);
                        record.restarts += 1;
                    }
                    if started.elapsed() < START_SECONDS {
                        failures_in_row += 1;
                        self.back_off(&member, &mut wanted, failures_in_row).await;
                    } else {
                        failures_in_row = 0;
                    }
                }
                None => {
                    member.phase.send_replace(Phase::Stopping);
                    let how = stop(&mut children, STOP_GRACE).await;
                    // Patroni stops its PostgreSQL when it stops; one left behind (Patroni
                    // killed meanwhile) gets a fast shutdown.
                    if let Some(postmaster) = self.postmaster_pid(&member) {
                        stop_pid(postmaster, libc::SIGINT, STOP_GRACE).await;
                    }
                    let mut record = member.record();
                    record.pid = None;
                    record.last_exit = Some(how);
                }
            }
            member.phase.send_replace(Phase::Stopped);
            self.write_pid_list();
        }
    }

    async fn back_off(&self, member: &Member, wanted: &mut watch::Receiver<bool>, failures: u32) {
        member.phase.send_replace(Phase::Backoff);
        let pause = FIRST_BACKOFF
            .saturating_mul(1 << failures.saturating_sub(1).min(6))
            .min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = wanted.wait_for(|w| !*w) => {}
        }
    }

    /// Starts a member's programs: one for most kinds, several for a Swift storage node.
    /// They share one process group (the first one's), so a kill takes them all.
    fn spawn(&self, member: &Member) -> anyhow::Result<Vec<tokio::process::Child>> {
        let log = self.log_file(member)?;
        let mut children: Vec<tokio::process::Child> = Vec::new();
        for mut command in self.commands(member)? {
            let group = children.first().and_then(|c| c.id()).unwrap_or(0);
            command
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log.try_clone()?)
                // Its own process group: a Ctrl-C in the terminal reaches the supervisor
                // only, which then stops the members in order; and a kill takes the group.
                .process_group(group as i32);
            match command.spawn() {
                Ok(child) => children.push(child),
                Err(error) => {
                    for started in &mut children {
                        // Reaped by tokio once dead.
                        let _ = started.start_kill();
                    }
                    return Err(anyhow::anyhow!("{error}"));
                }
            }
        }
        anyhow::ensure!(!children.is_empty(), "{} has nothing to run", member.name);
        Ok(children)
    }

    /// The programs of a member, with their arguments and environment.
    fn commands(&self, member: &Member) -> anyhow::Result<Vec<tokio::process::Command>> {
        let settings = &self.settings;
        let topology = self.topology();
        let command = match member.kind {
            Kind::Etcd => {
                let tier = self.data_tier()?;
                let me = topology
                    .etcd
                    .iter()
                    .find(|p| p.name == member.name)
                    .ok_or_else(|| anyhow::anyhow!("{} has no ports", member.name))?;
                let mut command = tokio::process::Command::new(&tier.programs.etcd);
                command.args(etcd::arguments(
                    me,
                    &topology.etcd,
                    &self.member_dir(member).join("data"),
                ));
                command
            }
            Kind::Postgres => {
                let tier = self.data_tier()?;
                let node = self
                    .postgres_node(member)
                    .ok_or_else(|| anyhow::anyhow!("{} has no ports", member.name))?;
                let layout = postgres::Layout {
                    dir: self.member_dir(member),
                };
                std::fs::create_dir_all(&layout.dir)?;
                let tls = self.settings.tls.as_ref();
                if let Some(tls) = tls {
                    layout.install_certificate(tls)?;
                }
                let config = postgres::patroni_config(
                    &node,
                    &topology.etcd,
                    &layout,
                    &tier.programs.postgres_bin,
                    &tier.secrets,
                    tls,
                );
                postgres::write_private(&layout.config(), &serde_json::to_string_pretty(&config)?)?;
                let mut command = tokio::process::Command::new(&tier.programs.patroni);
                command.arg(layout.config());
                // Patroni finds pg_ctl and friends through bin_dir; HOME is for libpq's files.
                command.env("HOME", &layout.dir);
                crate::server_user::run_as_server_user(&mut command, &layout.dir)?;
                command
            }
            Kind::SwiftRsync | Kind::SwiftNode | Kind::SwiftProxy => {
                return self.swift_commands(member, &topology);
            }
            kind => {
                let bind = self
                    .address(member, 0)
                    .map(|_| SocketAddr::new(settings.host, member.ports[0]).to_string());
                let config = self.role_config(kind);
                self.faafo_command(
                    kind,
                    &member.name,
                    member.index,
                    bind.as_deref(),
                    config.as_deref(),
                )
            }
        };
        Ok(vec![command])
    }

    /// This binary set up as a faafo member of `kind`, with `config` as its `--config`.
    fn faafo_command(
        &self,
        kind: Kind,
        name: &str,
        index: u32,
        bind: Option<&str>,
        config: Option<&Path>,
    ) -> tokio::process::Command {
        let settings = &self.settings;
        let topology = self.topology();
        let mut command = tokio::process::Command::new(&settings.exe);
        faafo::configure(
            &mut command,
            kind,
            name,
            bind,
            &topology,
            &self.backing(&topology, index),
        );
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        command
            .env("FAAFO_WORKER_TOKEN", &settings.worker_token)
            .env_remove("FAAFO_ADVERTISE_URL");
        // Only what this cluster was given: not what its own environment holds
        // (a FAAFO_CONFIG meant for one role would stop the others).
        for variable in [
            "FAAFO_TLS_CERT",
            "FAAFO_TLS_KEY",
            "FAAFO_CA_CERT",
            "FAAFO_CONFIG",
        ] {
            command.env_remove(variable);
        }
        if let Some(tls) = &settings.tls {
            let serves = matches!(kind, Kind::Gateway | Kind::Api);
            command.envs(tls.environment(serves));
        }
        command
    }

    /// The configuration file members of `kind` are started with, when the cluster has
    /// a members' configuration.
    fn role_config(&self, kind: Kind) -> Option<PathBuf> {
        self.settings.member_config.as_ref()?;
        let table = member_config::table_of(kind)?;
        Some(
            self.settings
                .dir
                .join("config")
                .join(format!("{table}.toml")),
        )
    }

    /// Reads the members' configuration file and checks each role's table the way its
    /// members will read it (this binary with their flags and `--print-config`); only when
    /// every table is valid are the role files replaced. Returns the roles whose file
    /// changed.
    pub async fn write_member_config(&self) -> Result<Vec<Kind>, String> {
        let Some(source) = &self.settings.member_config else {
            return Err(
                "this cluster was started without --config: it has no members' configuration to \
                 reload"
                    .into(),
            );
        };
        let roles = member_config::split(source).map_err(|e| format!("{e:#}"))?;
        let dir = self.settings.dir.join("config");
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut changed = Vec::new();
        for (kind, text) in &roles {
            let path = self.role_config(*kind).expect("a role of the file");
            if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
                continue;
            }
            let candidate = path.with_extension("toml.new");
            postgres::write_private(&candidate, text).map_err(|e| format!("{e:#}"))?;
            let table = member_config::table_of(*kind).expect("a role of the file");
            let checked = self.check_role_config(*kind, &candidate).await;
            if let Err(error) = checked {
                let _ = std::fs::remove_file(&candidate);
                for (kind, _) in &changed {
                    let _ = std::fs::remove_file(
                        self.role_config(*kind)
                            .expect("a role")
                            .with_extension("toml.new"),
                    );
                }
                return Err(format!(
                    "the [{table}] settings of {} are not valid, nothing changed: {error}",
                    source.display()
                ));
            }
            changed.push((*kind, candidate));
        }
        for (kind, candidate) in &changed {
            let path = self.role_config(*kind).expect("a role of the file");
            std::fs::rename(candidate, &path)
                .map_err(|e| format!("replacing {}: {e}", path.display()))?;
        }
        Ok(changed.into_iter().map(|(kind, _)| kind).collect())
    }

    /// Whether a member of `kind` started with `config` would take it.
    async fn check_role_config(&self, kind: Kind, config: &Path) -> Result<(), String> {
        let bind = SocketAddr::new(self.settings.host, 0).to_string();
        let mut command =
            self.faafo_command(kind, &format!("{kind}-check"), 1, Some(&bind), Some(config));
        command
            .arg("--print-config")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(20), command.output())
            .await
            .map_err(|_| "checking it took over 20 s".to_owned())?
            .map_err(|e| format!("cannot run {}: {e}", self.settings.exe.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            // What the member would say, less the candidate file's own name.
            let said = String::from_utf8_lossy(&output.stderr);
            let said = said.trim().trim_start_matches("faafo: ");
            Err(said
                .replace(&format!("with the settings of {}: ", config.display()), "")
                .to_owned())
        }
    }

    /// A reload that waits for any topology change under way, saying what it did.
    pub async fn reload_now(&self) -> Result<String, String> {
        let _change = self.changing.lock().await;
        match self.reload().await? {
            Reply::Done { message } => Ok(message),
            other => Ok(format!("{other:?}")),
        }
    }

    /// `cluster reload`: the members' configuration file read and checked again, then
    /// every running member of a role whose settings changed re-reads them (SIGHUP).
    async fn reload(&self) -> Result<Reply, String> {
        let changed = self.write_member_config().await?;
        if changed.is_empty() {
            return Ok(Reply::Done {
                message: "the configuration is unchanged: no member was told".into(),
            });
        }
        let mut told = Vec::new();
        for member in self.members() {
            if !changed.contains(&member.kind) || member.phase() != Phase::Running {
                continue;
            }
            let pid = member.record().pid;
            if let Some(pid) = pid {
                signal(pid, libc::SIGHUP);
                told.push(member);
            }
        }
        Ok(Reply::Done {
            message: format!(
                "checked and reloaded: {} (each one's log says what changed; stopped members \
                 take it when they start)",
                names(&told)
            ),
        })
    }

    /// A Swift member's programs, after (re)writing the cluster's configuration files
    /// and, the first time, its rings.
    fn swift_commands(
        &self,
        member: &Member,
        topology: &Topology,
    ) -> anyhow::Result<Vec<tokio::process::Command>> {
        let tier = self
            .settings
            .swift
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this cluster runs no Swift"))?;
        let rsync = topology
            .swift_rsync
            .ok_or_else(|| anyhow::anyhow!("the Swift rsync daemon has no port"))?;
        swift::write_configs(
            &tier.layout,
            &topology.swift_nodes,
            &topology.swift_proxies,
            rsync,
            &tier.hash_suffix,
        )?;
        swift::build_rings(&tier.layout, &topology.swift_nodes)?;
        let command = |program: &str, config: &std::path::Path| {
            let mut command = tokio::process::Command::new(program);
            // -v: logs on stdout, into the member's log (there may be no syslog).
            command.arg(config).arg("-v");
            command
        };
        Ok(match member.kind {
            Kind::SwiftRsync => {
                let mut rsync = tokio::process::Command::new("rsync");
                rsync
                    .args(["--daemon", "--no-detach", "--config"])
                    .arg(tier.layout.rsync_config());
                vec![rsync]
            }
            Kind::SwiftNode => swift::node_programs(&tier.layout, &member.name)
                .iter()
                .map(|(program, config)| command(program, config))
                .collect(),
            _ => vec![command(
                "swift-proxy-server",
                &tier.layout.proxy_config(&member.name),
            )],
        })
    }

    /// How the API instances reach the data: the data tier's PostgreSQL through the
    /// Patroni fence when the cluster runs one, else what `cluster up` was given.
    fn backing(&self, topology: &Topology, index: u32) -> faafo::Backing {
        let mut backing = self.settings.backing.clone();
        if let Some(tier) = &self.settings.data_tier {
            backing.database_url = postgres::database_url(
                &topology.postgres,
                &tier.secrets,
                self.settings.tls.as_ref(),
            );
            backing.patroni = topology.patroni_urls();
        }
        // Each API instance has a Swift proxy of its own (the one of its index): a dead
        // proxy takes only its API out of rotation.
        if self.settings.swift.is_some()
            && let Some((_, proxy)) = topology
                .swift_proxies
                .iter()
                .find(|(name, _)| *name == format!("{}-{index}", Kind::SwiftProxy))
        {
            backing.object_store = swift::object_store_url(swift::BUCKET, *proxy);
            backing.s3_credentials = true;
        }
        // The status page shows the storage nodes, checked at their object servers.
        if !topology.swift_nodes.is_empty() {
            let nodes: Vec<String> = topology
                .swift_nodes
                .iter()
                .map(|node| format!("http://{}", node.object))
                .collect();
            backing
                .api_args
                .push(format!("--storage-nodes={}", nodes.join(",")));
        }
        backing
    }

    pub fn patroni_urls(&self) -> Vec<String> {
        self.topology().patroni_urls()
    }

    fn data_tier(&self) -> anyhow::Result<&DataTier> {
        self.settings
            .data_tier
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this cluster runs no data tier"))
    }

    /// A data member's own directory: `DATA/cluster/etcd-1`, `DATA/cluster/postgres-2`.
    fn member_dir(&self, member: &Member) -> PathBuf {
        self.settings.dir.join(&member.name)
    }

    fn log_file(&self, member: &Member) -> anyhow::Result<File> {
        let path = self.log_path(&member.name);
        let mut log = OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(
            log,
            "--- faafo cluster: starting {} at {} ---",
            member.name,
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )?;
        Ok(log)
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.settings.dir.join("logs").join(format!("{name}.log"))
    }

    /// Records the members' pids, so that a supervisor started after this one was killed
    /// can stop the members it left behind.
    fn write_pid_list(&self) {
        let pids: Vec<String> = self
            .members()
            .iter()
            .flat_map(|m| [m.record().pid, self.postmaster_pid(m)])
            .flatten()
            .map(|pid| pid.to_string())
            .collect();
        let path = self.settings.dir.join("pids");
        if let Err(error) = std::fs::write(&path, pids.join("\n")) {
            tracing::warn!(%error, path = %path.display(), "cannot write the pid list");
        }
    }

    /// Starts the topology kind by kind in [`Kind`]'s order, each kind ready before the
    /// next (so that a wrong database URL is reported here). Every member is known, with
    /// its ports, before the first starts: the configurations name them all.
    pub async fn start(self: &Arc<Self>, counts: &[(Kind, u32)]) -> anyhow::Result<()> {
        let mut counts = counts.to_vec();
        counts.sort();
        let mut added = Vec::new();
        for &(kind, count) in &counts {
            added.push((kind, count, self.add(kind, count, false)?));
        }
        for (kind, count, members) in added {
            for member in &members {
                member.wanted.send_replace(true);
            }
            for member in &members {
                if let Err(error) = self.wait_ready(member).await {
                    anyhow::bail!(
                        "{error}\nlast lines of {}:\n{}",
                        self.log_path(&member.name).display(),
                        tail(&self.log_path(&member.name), 15)
                    );
                }
            }
            if kind == Kind::Postgres && count > 0 {
                let tier = self.data_tier()?;
                postgres::ensure_database(
                    &self.topology().postgres,
                    &tier.secrets,
                    self.settings.tls.as_ref(),
                    READY_TIMEOUT,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Waits until a member answers as ready: `/readyz` for an API, the health of a
    /// gateway, a running process for a worker.
    async fn wait_ready(&self, member: &Member) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let restarts_before = member.record().restarts;
        loop {
            let health = self.health(member).await;
            if member.phase() == Phase::Running && health.ready {
                return Ok(());
            }
            // A member that keeps exiting will not get better by waiting (a port in use,
            // a database that refuses it): say so now.
            let failing = {
                let record = member.record();
                (record.restarts >= restarts_before + 3).then(|| record.last_exit.clone())
            };
            if let Some(last_exit) = failing {
                anyhow::bail!(
                    "{} keeps exiting before it is ready ({})",
                    member.name,
                    last_exit.as_deref().unwrap_or("no exit recorded")
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not become ready in {READY_TIMEOUT:?} ({}; {})",
                    member.name,
                    member.phase().as_str(),
                    health.text
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn health(&self, member: &Member) -> Health {
        match member.kind {
            Kind::Api => match self.url(member) {
                Some(url) => faafo::api_health(&self.http, &url).await,
                None => Health::not("no address"),
            },
            Kind::Gateway => match self.url(member) {
                Some(url) => faafo::gateway_health(&self.http, &url).await,
                None => Health::not("no address"),
            },
            Kind::Worker => Health::ready("-"),
            Kind::Probe => match self.address(member, 0) {
                Some(address) => faafo::probe_health(&self.http, address).await,
                None => Health::not("no address"),
            },
            Kind::Etcd => match self.address(member, 0) {
                Some(client) => etcd::health(&self.http, client).await,
                None => Health::not("no address"),
            },
            Kind::Postgres => match self.postgres_node(member) {
                Some(node) => postgres::health(&self.http, &node).await,
                None => Health::not("no address"),
            },
            Kind::SwiftNode => {
                let topology = self.topology();
                match topology.swift_nodes.iter().find(|n| n.name == member.name) {
                    Some(node) => swift::node_health(&self.http, node).await,
                    None => Health::not("no address"),
                }
            }
            Kind::SwiftProxy => match self.address(member, 0) {
                Some(address) if swift::healthy(&self.http, address).await => {
                    Health::ready("healthy")
                }
                _ => Health::not("down: does not answer"),
            },
            Kind::SwiftRsync => match self.address(member, 0) {
                Some(address) if tokio::net::TcpStream::connect(address).await.is_ok() => {
                    Health::ready("listening")
                }
                _ => Health::not("down: not listening"),
            },
        }
    }

    /// The pid of a postgres member's postmaster (Patroni starts it in a session of its
    /// own, so it outlives Patroni).
    fn postmaster_pid(&self, member: &Member) -> Option<u32> {
        (member.kind == Kind::Postgres).then(|| {
            postgres::Layout {
                dir: self.member_dir(member),
            }
            .postmaster_pid()
        })?
    }

    /// Waits until every running gateway has `api_url` up (or, with `up` false, no longer
    /// sends it requests), so the next step of a rolling restart never leaves a gateway
    /// without a backend.
    async fn wait_gateways_see(&self, api_url: &str, up: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        for gateway in self.of_kind(Kind::Gateway) {
            let Some(url) = self.url(&gateway) else {
                continue;
            };
            loop {
                if gateway.phase() != Phase::Running {
                    break;
                }
                if let Some(stats) = faafo::gateway_stats(&self.http, &url).await {
                    let is_up = stats
                        .backends
                        .iter()
                        .any(|b| b.url == api_url && b.state == "up");
                    if is_up == up {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "gateway {} did not see {api_url} {} within 15 s",
                        gateway.name,
                        if up { "up" } else { "down" }
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    /// The members a NAME or GROUP names.
    fn resolve(&self, target: &str) -> Result<Vec<Arc<Member>>, String> {
        let members = self.members();
        let group = match target {
            "all" => Some(None),
            other => Kind::parse(other).map(Some),
        };
        let chosen: Vec<Arc<Member>> = match group {
            Some(kind) => members
                .into_iter()
                .filter(|m| kind.is_none_or(|k| m.kind == k))
                .collect(),
            None => members.into_iter().filter(|m| m.name == target).collect(),
        };
        if chosen.is_empty() {
            let names: Vec<String> = self.members().iter().map(|m| m.name.clone()).collect();
            let mut groups: BTreeSet<&str> =
                self.members().iter().map(|m| m.kind.as_str()).collect();
            groups.insert("all");
            return Err(format!(
                "no member or group {target:?}; groups: {}; members: {}",
                groups.into_iter().collect::<Vec<_>>().join(", "),
                names.join(", ")
            ));
        }
        Ok(chosen)
    }

    /// Carries out one control request, reporting through `replies`.
    pub async fn handle(self: Arc<Self>, request: Request, replies: Replies) {
        let outcome = match request {
            Request::Status => {
                if let Some(line) = self.autoscale_line() {
                    progress(&replies, line);
                }
                Ok(Reply::Status {
                    members: self.status().await,
                })
            }
            Request::Autoscale {
                range,
                scale_down_after_ms,
            } => Ok(self.set_autoscale(range, Duration::from_millis(scale_down_after_ms))),
            Request::Kill { target, stay_down } => self.kill(target.as_deref(), stay_down).await,
            Request::Down => {
                self.down.cancel();
                Ok(Reply::Done {
                    message: "stopping every member".into(),
                })
            }
            Request::Start { target } => {
                let _change = self.changing.lock().await;
                self.set_wanted(&target, true, &replies).await
            }
            Request::Stop { target } => {
                let _change = self.changing.lock().await;
                self.set_wanted(&target, false, &replies).await
            }
            Request::Restart { target, rolling } => {
                let _change = self.changing.lock().await;
                self.restart(&target, rolling, &replies).await
            }
            Request::Scale { counts } => {
                let _change = self.changing.lock().await;
                self.scale(&counts, &replies).await
            }
            Request::Reload => {
                let _change = self.changing.lock().await;
                self.reload().await
            }
        };
        let _ = replies.send(outcome.unwrap_or_else(|message| Reply::Failed { message }));
    }

    pub async fn status(&self) -> Vec<MemberStatus> {
        let members = self.members();
        let healths = futures::future::join_all(members.iter().map(|m| self.health(m))).await;
        members
            .iter()
            .zip(healths)
            .map(|(member, health)| {
                let record = member.record();
                let phase = member.phase();
                MemberStatus {
                    name: member.name.clone(),
                    role: member.kind,
                    pid: record.pid,
                    state: phase.as_str().to_owned(),
                    uptime_s: record
                        .started
                        .filter(|_| phase == Phase::Running)
                        .map(|s| s.elapsed().as_secs_f64()),
                    restarts: record.restarts,
                    url: self.display_address(member),
                    health: if phase == Phase::Running {
                        health.text
                    } else {
                        "-".into()
                    },
                    last_exit: record.last_exit.clone(),
                }
            })
            .collect()
    }

    /// SIGKILL: the named member, or (chaos) a random one, but only while every member is
    /// running and has been for a second, and every member holding data is healthy, so
    /// one failure is injected at a time and never a second copy of the data while one is
    /// still recovering. A member's whole process group dies, and a postgres member's
    /// PostgreSQL with its Patroni, as in the death of a host.
    async fn kill(&self, target: Option<&str>, stay_down: bool) -> Result<Reply, String> {
        let member = match target {
            Some(target) => {
                let mut chosen = self.resolve(target)?;
                if chosen.len() != 1 {
                    return Err("kill takes one member, not a group".into());
                }
                chosen.remove(0)
            }
            None => {
                let members = self.members();
                let settling = members.iter().find(|m| {
                    m.phase() != Phase::Running
                        || m.record()
                            .started
                            .is_none_or(|s| s.elapsed() < START_SECONDS)
                });
                if let Some(member) = settling {
                    return Ok(Reply::Done {
                        message: format!("skipped: {} is still (re)starting", member.name),
                    });
                }
                for member in members.iter().filter(|m| m.kind.holds_data()) {
                    let health = self.health(member).await;
                    if !health.ready {
                        return Ok(Reply::Done {
                            message: format!(
                                "skipped: {} is still recovering ({})",
                                member.name, health.text
                            ),
                        });
                    }
                }
                if members.is_empty() {
                    return Err("no members".into());
                }
                members[rand::random_range(0..members.len())].clone()
            }
        };
        let Some(pid) = member.record().pid else {
            return Err(format!("{} is not running", member.name));
        };
        if stay_down {
            // Not wanted any more: its task sees it die and does not start it again.
            member.wanted.send_replace(false);
        }
        // PostgreSQL's processes each start a session of their own, so a process group
        // does not hold them: the postmaster's children are found by their parent.
        let mut doomed = self
            .postmaster_pid(&member)
            .map(process_tree)
            .unwrap_or_default();
        doomed.extend(process_tree(pid));
        signal_group(pid, libc::SIGKILL);
        for pid in doomed {
            signal(pid, libc::SIGKILL);
        }
        Ok(Reply::Killed {
            name: member.name.clone(),
            pid,
        })
    }

    async fn set_wanted(
        &self,
        target: &str,
        wanted: bool,
        replies: &Replies,
    ) -> Result<Reply, String> {
        let members = self.resolve(target)?;
        self.apply(&members, wanted, replies).await?;
        let verb = if wanted { "started" } else { "stopped" };
        Ok(Reply::Done {
            message: format!("{verb} {}", names(&members)),
        })
    }

    /// Makes `members` wanted (or not) and waits until they are ready (or stopped).
    async fn apply(
        &self,
        members: &[Arc<Member>],
        wanted: bool,
        replies: &Replies,
    ) -> Result<(), String> {
        // Stop workers first and the data tier last; start in the opposite order.
        let mut ordered: Vec<&Arc<Member>> = members.iter().collect();
        ordered.sort_by_key(|m| m.kind);
        if !wanted {
            ordered.reverse();
        }
        for member in &ordered {
            member.wanted.send_replace(wanted);
        }
        for member in ordered {
            if wanted {
                self.wait_ready(member).await.map_err(|e| e.to_string())?;
                progress(replies, format!("{} is up", member.name));
            } else {
                member
                    .phase
                    .subscribe()
                    .wait_for(|p| *p == Phase::Stopped)
                    .await
                    .map_err(|e| e.to_string())?;
                progress(replies, format!("{} stopped", member.name));
            }
        }
        Ok(())
    }

    async fn restart(
        &self,
        target: &str,
        rolling: bool,
        replies: &Replies,
    ) -> Result<Reply, String> {
        let members = self.resolve(target)?;
        let all_names = names(&members);
        if !rolling {
            self.apply(&members, false, replies).await?;
            self.apply(&members, true, replies).await?;
            return Ok(Reply::Done {
                message: format!("restarted {}", names(&members)),
            });
        }
        // A leader goes last, and not by being stopped: it hands over first.
        let (mut members, databases): (Vec<_>, Vec<_>) =
            members.into_iter().partition(|m| m.kind != Kind::Postgres);
        if !databases.is_empty() {
            self.rolling_postgres(&databases, replies).await?;
        }
        members.retain(|m| m.kind != Kind::Postgres);
        for member in &members {
            let started = Instant::now();
            progress(replies, format!("{}: draining and stopping", member.name));
            self.apply(std::slice::from_ref(member), false, replies)
                .await?;
            self.apply(std::slice::from_ref(member), true, replies)
                .await?;
            if member.kind == Kind::Api
                && let Some(url) = self.url(member)
            {
                self.wait_gateways_see(&url, true)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            progress(
                replies,
                format!(
                    "{}: back in service after {:.1} s",
                    member.name,
                    started.elapsed().as_secs_f64()
                ),
            );
        }
        Ok(Reply::Done {
            message: format!("rolling restart of {all_names} done"),
        })
    }

    /// A rolling restart of postgres members: the replicas one at a time, then a planned
    /// switchover from the leader to a synchronous standby (which has every acknowledged
    /// commit), then the old leader. Each step waits until the cluster is whole again: every
    /// member running and a synchronous standby in place.
    async fn rolling_postgres(
        &self,
        chosen: &[Arc<Member>],
        replies: &Replies,
    ) -> Result<(), String> {
        self.postgres_settled().await?;
        let leader = self.postgres_leader().await?;
        let (old_leader, replicas): (Vec<_>, Vec<_>) =
            chosen.iter().cloned().partition(|m| m.name == leader);
        for member in &replicas {
            self.restart_postgres_member(member, replies).await?;
        }
        if let Some(old_leader) = old_leader.first() {
            let view = self.postgres_view().await?;
            let candidate = view
                .iter()
                .find(|m| m.role == "sync_standby" && m.is_running())
                .ok_or("no synchronous standby to hand the leadership to")?
                .name
                .clone();
            let node = self
                .postgres_node(old_leader)
                .ok_or("the leader has no address")?;
            let started = Instant::now();
            progress(replies, format!("{leader}: switching over to {candidate}"));
            postgres::switchover(&self.http_long, node.rest, &leader, &candidate)
                .await
                .map_err(|e| e.to_string())?;
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if self.postgres_leader().await.ok().as_deref() == Some(candidate.as_str()) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{candidate} did not take over within {READY_TIMEOUT:?}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            progress(
                replies,
                format!(
                    "{candidate} leads after {:.1} s",
                    started.elapsed().as_secs_f64()
                ),
            );
            self.postgres_settled().await?;
            self.restart_postgres_member(old_leader, replies).await?;
        }
        Ok(())
    }

    async fn restart_postgres_member(
        &self,
        member: &Arc<Member>,
        replies: &Replies,
    ) -> Result<(), String> {
        let started = Instant::now();
        progress(replies, format!("{}: stopping", member.name));
        self.apply(std::slice::from_ref(member), false, replies)
            .await?;
        self.apply(std::slice::from_ref(member), true, replies)
            .await?;
        self.postgres_settled().await?;
        progress(
            replies,
            format!(
                "{}: back after {:.1} s",
                member.name,
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// The cluster as the first Patroni that answers sees it.
    async fn postgres_view(&self) -> Result<Vec<postgres::ClusterMember>, String> {
        let mut why = String::from("no postgres members");
        for member in self.of_kind(Kind::Postgres) {
            let Some(node) = self.postgres_node(&member) else {
                continue;
            };
            match postgres::cluster(&self.http, node.rest).await {
                Ok(view) => return Ok(view),
                Err(error) => why = format!("{}: {error}", member.name),
            }
        }
        Err(format!("no Patroni answers ({why})"))
    }

    async fn postgres_leader(&self) -> Result<String, String> {
        self.postgres_view()
            .await?
            .into_iter()
            .find(|m| m.role == "leader" && m.is_running())
            .map(|m| m.name)
            .ok_or_else(|| "PostgreSQL has no running leader".to_owned())
    }

    /// Waits until every postgres member runs, one leads and one is a synchronous
    /// standby.
    async fn postgres_settled(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let wanted = self.of_kind(Kind::Postgres).len();
        loop {
            let mut why = String::new();
            match self.postgres_view().await {
                Ok(view) => {
                    let running = view.iter().filter(|m| m.is_running()).count();
                    let has = |role: &str| view.iter().any(|m| m.role == role);
                    if running == wanted && has("leader") && (wanted < 2 || has("sync_standby")) {
                        return Ok(());
                    }
                    why = format!(
                        "{running} of {wanted} running, leader: {}, sync standby: {}",
                        has("leader"),
                        has("sync_standby")
                    );
                }
                Err(error) => why.push_str(&error),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "PostgreSQL did not settle within {READY_TIMEOUT:?} ({why})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Has the workers follow the queue within `range`, or stops that (`None`).
    pub fn set_autoscale(&self, range: Option<Range>, scale_down_after: Duration) -> Reply {
        let mut autoscaler = self.autoscaler.lock().unwrap_or_else(|p| p.into_inner());
        *autoscaler = range.map(|range| Autoscaler::new(range, scale_down_after));
        let message = match range {
            Some(Range { min, max }) => format!(
                "workers now follow the queue: {min} to {max}, scaled down after {:.0} s idle",
                scale_down_after.as_secs_f64()
            ),
            None => "autoscaling is off: the workers stay as many as they are".to_owned(),
        };
        tracing::info!("{message}");
        Reply::Done { message }
    }

    fn autoscale_line(&self) -> Option<String> {
        let current = self.of_kind(Kind::Worker).len() as u32;
        let autoscaler = self.autoscaler.lock().unwrap_or_else(|p| p.into_inner());
        autoscaler.as_ref().map(|a| a.describe(current))
    }

    /// Every [`autoscale::INTERVAL`], sets the number of workers from the queue, while
    /// autoscaling is on; until `down`.
    pub async fn autoscale(self: Arc<Self>) {
        let (replies, _ignored) = tokio::sync::mpsc::unbounded_channel();
        loop {
            tokio::select! {
                _ = self.down.cancelled() => return,
                _ = tokio::time::sleep(autoscale::INTERVAL) => {}
            }
            if self
                .autoscaler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
            {
                continue;
            }
            let Some(queue) = self.read_queue().await else {
                continue;
            };
            // A restart or scale in progress goes first; the next reading decides again.
            let Ok(_change) = self.changing.try_lock() else {
                continue;
            };
            let current = self.of_kind(Kind::Worker).len() as u32;
            let decision = {
                let mut autoscaler = self.autoscaler.lock().unwrap_or_else(|p| p.into_inner());
                match autoscaler.as_mut() {
                    Some(autoscaler) => autoscaler.decide(&queue, current, Instant::now()),
                    None => continue,
                }
            };
            if decision.target != current {
                tracing::info!(from = current, to = decision.target, reason = %decision.reason, "autoscaling workers");
                if let Err(error) = self
                    .scale_to(&[(NodeRole::Worker, decision.target)], &replies)
                    .await
                {
                    tracing::warn!(%error, "autoscaling workers");
                }
            }
        }
    }

    /// The queue, from the first API instance that answers.
    async fn read_queue(&self) -> Option<faafo_core::node::QueueView> {
        for url in self.api_urls() {
            let answer = self.http.get(format!("{url}/v1/nodes")).send().await;
            if let Ok(answer) = answer
                && answer.status().is_success()
                && let Ok(status) = answer.json::<faafo_core::node::ClusterStatus>().await
            {
                return Some(status.queue);
            }
        }
        None
    }

    async fn scale(
        self: &Arc<Self>,
        counts: &[(NodeRole, u32)],
        replies: &Replies,
    ) -> Result<Reply, String> {
        if counts.iter().any(|(role, _)| *role == NodeRole::Worker)
            && let Some(line) = self.autoscale_line()
        {
            return Err(format!(
                "the workers follow the queue ({line}); change the range with \
                 `faafo cluster autoscale worker=MIN..MAX`, or turn it off with `faafo cluster autoscale off`"
            ));
        }
        self.scale_to(counts, replies).await
    }

    async fn scale_to(
        self: &Arc<Self>,
        counts: &[(NodeRole, u32)],
        replies: &Replies,
    ) -> Result<Reply, String> {
        for &(role, count) in counts {
            let kind = match role {
                NodeRole::Gateway => Kind::Gateway,
                NodeRole::Api => Kind::Api,
                NodeRole::Worker => Kind::Worker,
            };
            let current = self.of_kind(kind);
            if kind == Kind::Api && self.settings.swift.is_some() {
                // Each API instance uses the Swift proxy of its index.
                let added = self
                    .grow(Kind::SwiftProxy, count.max(current.len() as u32))
                    .map_err(|e| e.to_string())?;
                for member in &added {
                    self.wait_ready(member).await.map_err(|e| e.to_string())?;
                    progress(replies, format!("{} is up", member.name));
                }
            }
            if count as usize > current.len() {
                let added = self.grow(kind, count).map_err(|e| e.to_string())?;
                for member in &added {
                    self.wait_ready(member).await.map_err(|e| e.to_string())?;
                    progress(replies, format!("{} is up", member.name));
                }
            } else if (count as usize) < current.len() {
                let mut surplus = current;
                surplus.sort_by_key(|m| m.index);
                let surplus = surplus.split_off(count as usize);
                self.apply(&surplus, false, replies).await?;
                let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
                members.retain(|m| !surplus.iter().any(|s| Arc::ptr_eq(s, m)));
                for member in &surplus {
                    member.retired.cancel();
                }
            }
        }
        let summary: Vec<String> = [Kind::Gateway, Kind::Api, Kind::Worker]
            .iter()
            .map(|kind| format!("{} {kind}(s)", self.of_kind(*kind).len()))
            .collect();
        Ok(Reply::Done {
            message: format!("now {}", summary.join(", ")),
        })
    }

    /// Stops every member (workers, then gateways, then APIs) and waits for them.
    pub async fn stop_all(&self) {
        let (replies, _ignored) = tokio::sync::mpsc::unbounded_channel();
        let members = self.members();
        if let Err(error) = self.apply(&members, false, &replies).await {
            tracing::warn!(%error, "stopping the members");
        }
        self.write_pid_list();
    }
}

fn names(members: &[Arc<Member>]) -> String {
    members
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid has no memory-safety effect; a pid that is gone fails with
    // ESRCH, which is harmless here.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Signals the process group `leader` leads (each member is started as one).
fn signal_group(leader: u32, signal: i32) {
    // SAFETY: as in `signal`; a negative pid names a process group.
    unsafe {
        libc::kill(-(leader as i32), signal);
    }
}

/// SIGTERM to every program, then SIGKILL to those still there after `grace`; says how
/// the first one ended.
async fn stop(children: &mut [tokio::process::Child], grace: Duration) -> String {
    for child in children.iter() {
        if let Some(pid) = child.id() {
            signal(
                pid,
                if grace.is_zero() {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                },
            );
        }
    }
    let mut first = None;
    for child in children.iter_mut() {
        let how = match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => format!("stopped ({})", describe_exit(status)),
            Ok(Err(error)) => format!("lost track of it: {error}"),
            Err(_) => {
                let _ = child.kill().await;
                format!("killed after not stopping within {grace:?}")
            }
        };
        first.get_or_insert(how);
    }
    first.unwrap_or_else(|| "nothing to stop".into())
}

/// The first exit of any of `children`.
async fn wait_any(children: &mut [tokio::process::Child]) -> std::io::Result<ExitStatus> {
    let waits = children.iter_mut().map(|c| Box::pin(c.wait()));
    futures::future::select_all(waits).await.0
}

fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}{}", signal_name(signal)),
        _ => status.to_string(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        _ => "",
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops members that a previous supervisor, killed before it could stop them, left
/// running: their ports and leases would get in the way of the new ones.
pub async fn stop_leftovers(dir: &std::path::Path) -> usize {
    let Ok(text) = std::fs::read_to_string(dir.join("pids")) else {
        return 0;
    };
    let exe = std::env::current_exe().ok();
    let leftovers: Vec<u32> = text
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .filter(|pid: &u32| {
            // Only our own processes: the pid may have been reused. faafo members run this
            // program; etcd, Patroni and PostgreSQL name a path in the cluster directory.
            let running = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let names_dir =
                String::from_utf8_lossy(&command_line).contains(&*dir.to_string_lossy());
            (running.is_some() && running == exe) || names_dir
        })
        .collect();
    let stops = leftovers
        .iter()
        .map(|&pid| stop_pid(pid, libc::SIGTERM, STOP_GRACE));
    futures::future::join_all(stops).await;
    leftovers.len()
}

/// Sends `first` to `pid`, and SIGKILL if it is still there after `grace`.
async fn stop_pid(pid: u32, first: i32, grace: Duration) {
    let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists();
    if !alive() {
        return;
    }
    signal(pid, first);
    let deadline = Instant::now() + grace;
    while alive() {
        if Instant::now() > deadline {
            signal(pid, libc::SIGKILL);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
