//! The supervisor of the local topology: it runs gateways, API instances and workers as
//! child processes of this same binary, restarts any that exit, and carries out the
//! control requests (status, stop, start, restart, rolling restart, scale, kill).
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
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faafo_core::NodeRole;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::control::{MemberStatus, Replies, Reply, Request, progress};

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

/// What the supervisor needs to start members.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This binary.
    pub exe: PathBuf,
    /// Logs, the control socket and the pid list live here.
    pub dir: PathBuf,
    pub host: IpAddr,
    pub database_url: String,
    pub object_store: String,
    pub worker_token: String,
    /// First port of each role (0: any free port).
    pub gateway_port: u16,
    pub api_port: u16,
    /// Extra flags for `faafo api` (lease and attempt settings).
    pub api_args: Vec<String>,
}

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
    role: NodeRole,
    index: u32,
    /// Kept across restarts: gateways and workers know APIs by address.
    port: Option<u16>,
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
    /// In start order: APIs, gateways, workers, each by index.
    members: Mutex<Vec<Arc<Member>>>,
    http: reqwest::Client,
    /// One topology change at a time, so that two rolling restarts cannot overlap.
    changing: tokio::sync::Mutex<()>,
    /// Cancelled by `down` (or a signal): the supervisor stops everything and exits.
    pub down: CancellationToken,
}

impl Supervisor {
    pub fn new(settings: Settings) -> anyhow::Result<Arc<Supervisor>> {
        std::fs::create_dir_all(settings.dir.join("logs"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()?;
        Ok(Arc::new(Supervisor {
            settings,
            members: Mutex::new(Vec::new()),
            http,
            changing: tokio::sync::Mutex::new(()),
            down: CancellationToken::new(),
        }))
    }

    fn members(&self) -> Vec<Arc<Member>> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn of_role(&self, role: NodeRole) -> Vec<Arc<Member>> {
        self.members()
            .into_iter()
            .filter(|m| m.role == role)
            .collect()
    }

    /// The URL this supervisor reaches a gateway or API at.
    fn url(&self, member: &Member) -> Option<String> {
        let host = if self.settings.host.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.settings.host
        };
        member
            .port
            .map(|port| format!("http://{}", SocketAddr::new(host, port)))
    }

    pub fn gateway_urls(&self) -> Vec<String> {
        self.of_role(NodeRole::Gateway)
            .iter()
            .filter_map(|m| self.url(m))
            .collect()
    }

    pub fn api_urls(&self) -> Vec<String> {
        self.of_role(NodeRole::Api)
            .iter()
            .filter_map(|m| self.url(m))
            .collect()
    }

    /// Adds members of `role` up to `count` and starts them; returns the new ones.
    fn grow(self: &Arc<Self>, role: NodeRole, count: u32) -> anyhow::Result<Vec<Arc<Member>>> {
        let mut added = Vec::new();
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let taken: BTreeSet<u32> = members
            .iter()
            .filter(|m| m.role == role)
            .map(|m| m.index)
            .collect();
        let used_ports: BTreeSet<u16> = members.iter().filter_map(|m| m.port).collect();
        let mut index = 1;
        while (taken.len() + added.len()) < count as usize {
            if taken.contains(&index) {
                index += 1;
                continue;
            }
            let port = match role {
                NodeRole::Worker => None,
                NodeRole::Gateway => {
                    Some(self.port(self.settings.gateway_port, index, &used_ports)?)
                }
                NodeRole::Api => Some(self.port(self.settings.api_port, index, &used_ports)?),
            };
            let member = Arc::new(Member {
                name: format!("{role}-{index}"),
                role,
                index,
                port,
                wanted: watch::Sender::new(true),
                phase: watch::Sender::new(Phase::Stopped),
                record: Mutex::new(Record::default()),
                retired: CancellationToken::new(),
            });
            members.push(Arc::clone(&member));
            added.push(member);
            index += 1;
        }
        members.sort_by_key(|m| (start_order(m.role), m.index));
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
            let mut child = match self.spawn(&member) {
                Ok(child) => child,
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
                record.pid = child.id();
                record.started = Some(started);
            }
            member.phase.send_replace(Phase::Running);
            self.write_pid_list();
            let exited = tokio::select! {
                status = child.wait() => Some(status),
                _ = wanted.wait_for(|w| !*w) => None,
            };
            match exited {
                Some(status) => {
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
                    let how = stop(&mut child, STOP_GRACE).await;
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

    fn spawn(&self, member: &Member) -> anyhow::Result<tokio::process::Child> {
        let settings = &self.settings;
        let mut command = tokio::process::Command::new(&settings.exe);
        let bind = member
            .port
            .map(|port| SocketAddr::new(settings.host, port).to_string());
        let apis = self.api_urls();
        match member.role {
            NodeRole::Gateway => {
                command.args(["gateway", "--discover", "--bind"]);
                command.arg(bind.as_deref().unwrap_or_default());
                for api in &apis {
                    command.args(["--backend", api]);
                }
            }
            NodeRole::Api => {
                command.args(["api", "--bind"]);
                command.arg(bind.as_deref().unwrap_or_default());
                command.args(["--database-url", &settings.database_url]);
                command.args(["--object-store", &settings.object_store]);
                command.args(&settings.api_args);
            }
            NodeRole::Worker => {
                command.args(["--endpoint-url", &apis.join(",")]);
                command.args(["worker", "--name"]);
                command.arg(format!("{}-{}", faafo_worker::host_name(), member.name));
            }
        }
        let log = self.log_file(member)?;
        command
            .env("FAAFO_WORKER_TOKEN", &settings.worker_token)
            .env_remove("FAAFO_ADVERTISE_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C in the terminal reaches the supervisor
            // only, which then stops the members in order.
            .process_group(0);
        Ok(command.spawn()?)
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
            .filter_map(|m| m.record().pid)
            .map(|pid| pid.to_string())
            .collect();
        let path = self.settings.dir.join("pids");
        if let Err(error) = std::fs::write(&path, pids.join("\n")) {
            tracing::warn!(%error, path = %path.display(), "cannot write the pid list");
        }
    }

    /// Starts the topology: APIs first (and waits until they are ready, so that a wrong
    /// database URL is reported here), then gateways, then workers.
    pub async fn start(
        self: &Arc<Self>,
        gateways: u32,
        apis: u32,
        workers: u32,
    ) -> anyhow::Result<()> {
        for (role, count) in [
            (NodeRole::Api, apis),
            (NodeRole::Gateway, gateways),
            (NodeRole::Worker, workers),
        ] {
            let added = self.grow(role, count)?;
            for member in &added {
                if let Err(error) = self.wait_ready(member).await {
                    anyhow::bail!(
                        "{error}\nlast lines of {}:\n{}",
                        self.log_path(&member.name).display(),
                        tail(&self.log_path(&member.name), 15)
                    );
                }
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
        let Some(url) = self.url(member) else {
            let running = member.phase() == Phase::Running;
            return Health {
                ready: running,
                text: "-".into(),
            };
        };
        match member.role {
            NodeRole::Api => match self.http.get(format!("{url}/readyz")).send().await {
                Ok(r) if r.status().is_success() => Health::ready("ready"),
                Ok(r) => Health::not(format!("not ready ({})", r.status())),
                Err(_) => Health::not("no answer"),
            },
            NodeRole::Gateway => {
                let answer = self.http.get(format!("{url}/__stats.json")).send().await;
                let stats = match answer {
                    Ok(r) if r.status().is_success() => r.json::<GatewayStats>().await.ok(),
                    _ => None,
                };
                match stats {
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
            NodeRole::Worker => Health::ready("-"),
        }
    }

    /// Waits until every running gateway has `api_url` up (or, with `up` false, no longer
    /// sends it requests), so the next step of a rolling restart never leaves a gateway
    /// without a backend.
    async fn wait_gateways_see(&self, api_url: &str, up: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        for gateway in self.of_role(NodeRole::Gateway) {
            let Some(url) = self.url(&gateway) else {
                continue;
            };
            loop {
                if gateway.phase() != Phase::Running {
                    break;
                }
                let answer = self.http.get(format!("{url}/__stats.json")).send().await;
                if let Ok(response) = answer
                    && let Ok(stats) = response.json::<GatewayStats>().await
                {
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
            "gateway" | "gateways" => Some(Some(NodeRole::Gateway)),
            "api" | "apis" => Some(Some(NodeRole::Api)),
            "worker" | "workers" => Some(Some(NodeRole::Worker)),
            _ => None,
        };
        let chosen: Vec<Arc<Member>> = match group {
            Some(role) => members
                .into_iter()
                .filter(|m| role.is_none_or(|r| m.role == r))
                .collect(),
            None => members.into_iter().filter(|m| m.name == target).collect(),
        };
        if chosen.is_empty() {
            let names: Vec<String> = self.members().iter().map(|m| m.name.clone()).collect();
            return Err(format!(
                "no member or group {target:?}; groups: all, gateway, api, worker; members: {}",
                names.join(", ")
            ));
        }
        Ok(chosen)
    }

    /// Carries out one control request, reporting through `replies`.
    pub async fn handle(self: Arc<Self>, request: Request, replies: Replies) {
        let outcome = match request {
            Request::Status => Ok(Reply::Status {
                members: self.status().await,
            }),
            Request::Kill { target } => self.kill(target.as_deref()),
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
                    role: member.role,
                    pid: record.pid,
                    state: phase.as_str().to_owned(),
                    uptime_s: record
                        .started
                        .filter(|_| phase == Phase::Running)
                        .map(|s| s.elapsed().as_secs_f64()),
                    restarts: record.restarts,
                    url: self.url(member),
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
    /// running and has been for a second, so one failure is injected at a time.
    fn kill(&self, target: Option<&str>) -> Result<Reply, String> {
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
                if members.is_empty() {
                    return Err("no members".into());
                }
                members[rand::random_range(0..members.len())].clone()
            }
        };
        let Some(pid) = member.record().pid else {
            return Err(format!("{} is not running", member.name));
        };
        signal(pid, libc::SIGKILL);
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
        // Stop workers first and APIs last; start in the opposite order.
        let mut ordered: Vec<&Arc<Member>> = members.iter().collect();
        ordered.sort_by_key(|m| start_order(m.role));
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
        if !rolling {
            self.apply(&members, false, replies).await?;
            self.apply(&members, true, replies).await?;
            return Ok(Reply::Done {
                message: format!("restarted {}", names(&members)),
            });
        }
        for member in &members {
            let started = Instant::now();
            progress(replies, format!("{}: draining and stopping", member.name));
            self.apply(std::slice::from_ref(member), false, replies)
                .await?;
            self.apply(std::slice::from_ref(member), true, replies)
                .await?;
            if member.role == NodeRole::Api
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
            message: format!("rolling restart of {} done", names(&members)),
        })
    }

    async fn scale(
        self: &Arc<Self>,
        counts: &[(NodeRole, u32)],
        replies: &Replies,
    ) -> Result<Reply, String> {
        for &(role, count) in counts {
            let current = self.of_role(role);
            if count as usize > current.len() {
                let added = self.grow(role, count).map_err(|e| e.to_string())?;
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
        let summary: Vec<String> = [NodeRole::Gateway, NodeRole::Api, NodeRole::Worker]
            .iter()
            .map(|role| format!("{} {role}(s)", self.of_role(*role).len()))
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

fn start_order(role: NodeRole) -> u8 {
    match role {
        NodeRole::Api => 0,
        NodeRole::Gateway => 1,
        NodeRole::Worker => 2,
    }
}

fn names(members: &[Arc<Member>]) -> String {
    members
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

struct Health {
    ready: bool,
    text: String,
}

impl Health {
    fn ready(text: &str) -> Health {
        Health {
            ready: true,
            text: text.into(),
        }
    }

    fn not(text: impl Into<String>) -> Health {
        Health {
            ready: false,
            text: text.into(),
        }
    }
}

/// The part of a gateway's `/__stats.json` the supervisor reads.
#[derive(Debug, serde::Deserialize)]
struct GatewayStats {
    backends: Vec<GatewayBackend>,
}

#[derive(Debug, serde::Deserialize)]
struct GatewayBackend {
    url: String,
    state: String,
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid has no memory-safety effect; a pid that is gone fails with
    // ESRCH, which is harmless here.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`.
async fn stop(child: &mut tokio::process::Child, grace: Duration) -> String {
    if let Some(pid) = child.id() {
        signal(pid, libc::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => format!("stopped ({})", describe_exit(status)),
        Ok(Err(error)) => format!("lost track of it: {error}"),
        Err(_) => {
            let _ = child.kill().await;
            format!("killed after not stopping within {grace:?}")
        }
    }
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
            // Only processes of this same program: the pid may have been reused.
            let running = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            running.is_some() && running == exe
        })
        .collect();
    for &pid in &leftovers {
        signal(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while leftovers
        .iter()
        .any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    {
        if Instant::now() > deadline {
            for &pid in &leftovers {
                signal(pid, libc::SIGKILL);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    leftovers.len()
}
