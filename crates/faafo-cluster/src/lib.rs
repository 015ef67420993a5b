//! `faafo cluster`: the whole topology on one machine, supervised. What supervisord does
//! in the seed's setup, knowing faafo: gateways (from port 9100), API instances (from
//! 9210) and workers, and with `--postgres-nodes` the data tier too (three etcd members
//! and Patroni-managed PostgreSQL members), restarted when they exit, with a log per
//! process, and controlled from other terminals through a socket in the data directory.
//!
//! `members/` says what each kind of member runs, `supervisor.rs` keeps them running,
//! `control.rs` is the socket protocol. The binary prints what [`ClusterCommand::run`]
//! returns.

pub mod autoscale;
mod control;
mod member_config;
pub mod members;
pub mod server_user;
mod supervisor;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use faafo_core::NodeRole;

pub use self::control::MemberStatus;
use self::control::{Reply, Request};
use self::members::{Kind, Programs, etcd, faafo, postgres, swift};
use self::supervisor::{
    DataTier, MAX_PER_ROLE, MAX_POSTGRES, MAX_SWIFT, Settings, Supervisor, SwiftTier,
};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start gateways, API instances and workers and keep them running, in the
    /// foreground (Ctrl-C stops them all).
    Up(ClusterUpArgs),
    /// Every member: state, pid, uptime, restarts, address and health.
    Status(Location),
    /// Stop a member (api-1) or a group (gateway, api, worker, postgres, etcd, all); it
    /// stays stopped.
    Stop(Targeted),
    /// Start stopped members again.
    Start(Targeted),
    /// Restart members; with --rolling, one at a time, each drained first and back in
    /// service before the next, so requests never fail (postgres: the replicas, then a
    /// switchover to a synchronous standby, then the old leader).
    Restart {
        #[command(flatten)]
        targeted: Targeted,
        /// One member at a time, waiting until it serves again before the next.
        #[arg(long)]
        rolling: bool,
    },
    /// Set how many members each role has: `scale api=3 worker=5`.
    Scale {
        /// ROLE=COUNT, for gateway, api and worker.
        #[arg(required = true, value_parser = parse_scale)]
        counts: Vec<(NodeRole, u32)>,
        #[command(flatten)]
        location: Location,
    },
    /// Kill one member with SIGKILL (the supervisor restarts it). A postgres member dies
    /// whole: Patroni and its PostgreSQL, as when its host dies.
    Kill {
        #[command(flatten)]
        targeted: Targeted,
        /// Leave it down, as a dead host stays down, until `cluster start NAME`.
        #[arg(long)]
        stay_down: bool,
    },
    /// Kill a random member with SIGKILL at every interval, one failure at a time, and
    /// print what was killed.
    Chaos {
        /// How long to go on: 60s, 2m, 500ms.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: Duration,
        /// Time between two kills: 2s, 500ms.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        #[command(flatten)]
        location: Location,
    },
    /// Have the workers follow the queue: `autoscale worker=1..6`, or `autoscale off`.
    /// `cluster status` shows the target and why.
    Autoscale {
        /// worker=MIN..MAX, or off.
        #[arg(value_parser = parse_autoscale)]
        rule: AutoscaleRule,
        /// Seconds with no task waiting before workers are stopped.
        #[arg(long, default_value_t = autoscale::DEFAULT_SCALE_DOWN_AFTER.as_secs_f64(), value_parser = positive_seconds)]
        scale_down_after: f64,
        #[command(flatten)]
        location: Location,
    },
    /// Check the members' configuration file (`cluster up --config`) again and have the
    /// members of each role whose settings changed re-read it, without a restart. An
    /// invalid file changes nothing and the command fails saying why.
    Reload(Location),
    /// Stop every member and the supervisor.
    Down(Location),
}

/// Which cluster: the one whose supervisor runs on this data directory.
#[derive(Debug, Args)]
pub struct Location {
    /// The data directory the cluster was started on (its control socket is there).
    #[arg(long, env = "FAAFO_DATA_DIR", default_value = "./faafo-data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct Targeted {
    /// A member (gateway-1, api-2, worker-3, postgres-1, etcd-2) or a group (gateway, api,
    /// worker, postgres, etcd, all).
    pub target: String,
    #[command(flatten)]
    pub location: Location,
}

#[derive(Debug, Args)]
pub struct ClusterUpArgs {
    /// Gateways to run (0: clients talk to the API instances).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=MAX_PER_ROLE as i64))]
    pub gateways: u32,
    /// API instances to run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=MAX_PER_ROLE as i64))]
    pub apis: u32,
    /// Workers to run (with --autoscale, only the starting count).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=MAX_PER_ROLE as i64))]
    pub workers: u32,
    /// Run PostgreSQL under Patroni with this many members (3 advised), plus three etcd
    /// members for Patroni's leader election, instead of SQLite. Needs the Debian
    /// packages patroni, etcd-server and postgresql.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=MAX_POSTGRES as i64), conflicts_with = "database_url")]
    pub postgres_nodes: u32,
    /// Keep the images in OpenStack Swift (through S3) with this many storage nodes and 3
    /// replicas (4 advised: any one can die), one Swift proxy per API instance and an
    /// rsync daemon, instead of a directory. Needs the Debian packages swift, swift-proxy,
    /// swift-object, swift-container, swift-account and rsync.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=MAX_SWIFT as i64), conflicts_with = "object_store")]
    pub swift_nodes: u32,
    #[command(flatten)]
    pub location: Location,
    /// The store (default: SQLite in the data directory); see `faafo api --help`.
    #[arg(long, env = "FAAFO_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where images are kept (default: a directory in the data directory).
    #[arg(long, env = "FAAFO_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// The address every member listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port of the first gateway; the others follow (0: any free ports).
    #[arg(long, default_value_t = 9100)]
    pub gateway_port: u16,
    /// Port of the first API instance; the others follow (0: any free ports).
    #[arg(long, default_value_t = 9210)]
    pub api_port: u16,
    /// Client port of the first etcd member; the others follow, and their peer ports
    /// start 100 higher (9310: clients 9310-9312, peers 9410-9412; 0: any free ports).
    #[arg(long, default_value_t = 9310)]
    pub etcd_port: u16,
    /// PostgreSQL port of the first postgres member; the others follow, and their
    /// Patroni REST APIs start 100 higher (9330: PostgreSQL 9330-, Patroni 9430-; away
    /// from a system PostgreSQL's 5432; 0: any free ports).
    #[arg(long, default_value_t = 9330)]
    pub postgres_port: u16,
    /// First port of the Swift storage nodes: account servers from it, container servers
    /// 100 higher, object servers 200 higher, proxies 300 higher (9500: 9500-, 9600-,
    /// 9700-, 9800-), the rsync daemon at 9899; 0: any free ports.
    #[arg(long, default_value_t = 9500)]
    pub swift_port: u16,
    /// How long a task's lease lasts without a heartbeat, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub lease_ms: u64,
    /// How many times a task may be leased before the fractal is failed.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Gateways and API instances serve HTTPS with this certificate chain (PEM), and
    /// PostgreSQL (--postgres-nodes) takes only TLS with it. It must name --host, where
    /// the members reach each other; they trust the system's roots and --ca-cert.
    #[arg(long, env = "FAAFO_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "FAAFO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Have the workers follow the queue: worker=MIN..MAX (one per task waiting or
    /// running, within the range). --workers is then only the starting count.
    #[arg(long, value_parser = parse_autoscale_range)]
    pub autoscale: Option<autoscale::Range>,
    /// With --autoscale: seconds with no task waiting before workers are stopped.
    #[arg(long, default_value_t = autoscale::DEFAULT_SCALE_DOWN_AFTER.as_secs_f64(), value_parser = positive_seconds, requires = "autoscale")]
    pub scale_down_after: f64,
    /// The members' settings: a TOML file with [api], [gateway] and [worker] tables,
    /// each holding what that role's --config file would (max-width = 2000, log-level =
    /// "debug"). `faafo cluster reload` (or SIGHUP) applies a changed file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// What a cluster command has to show.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// `cluster status`: every member.
    Members(Vec<MemberStatus>),
    /// A sentence saying what was done (`killed api-1 (pid 123) with SIGKILL`).
    Message { message: String },
    /// Commands that printed as they went (`up`, `chaos`).
    Nothing,
}

impl ClusterCommand {
    /// Carries out the command; `ca_cert` is faafo's `--ca-cert`, `on_progress` gets each
    /// progress line of a long request.
    pub async fn run(
        self,
        ca_cert: Option<PathBuf>,
        on_progress: impl FnMut(&str),
    ) -> anyhow::Result<Outcome> {
        let (location, request) = match self {
            ClusterCommand::Up(args) => {
                return up(args, ca_cert).await.map(|()| Outcome::Nothing);
            }
            ClusterCommand::Chaos {
                duration,
                interval,
                location,
            } => {
                return chaos(&location, duration, interval)
                    .await
                    .map(|()| Outcome::Nothing);
            }
            ClusterCommand::Status(location) => (location, Request::Status),
            ClusterCommand::Stop(t) => (t.location, Request::Stop { target: t.target }),
            ClusterCommand::Start(t) => (t.location, Request::Start { target: t.target }),
            ClusterCommand::Restart { targeted, rolling } => (
                targeted.location,
                Request::Restart {
                    target: targeted.target,
                    rolling,
                },
            ),
            ClusterCommand::Scale { counts, location } => (location, Request::Scale { counts }),
            ClusterCommand::Kill {
                targeted,
                stay_down,
            } => (
                targeted.location,
                Request::Kill {
                    target: Some(targeted.target),
                    stay_down,
                },
            ),
            ClusterCommand::Autoscale {
                rule,
                scale_down_after,
                location,
            } => (
                location,
                Request::Autoscale {
                    range: match rule {
                        AutoscaleRule::Off => None,
                        AutoscaleRule::Workers(range) => Some(range),
                    },
                    scale_down_after_ms: (scale_down_after * 1e3) as u64,
                },
            ),
            ClusterCommand::Reload(location) => (location, Request::Reload),
            ClusterCommand::Down(location) => (location, Request::Down),
        };
        let reply = control::call(&socket_path(&location.data_dir)?, &request, on_progress).await?;
        Ok(match reply {
            Reply::Status { members } => Outcome::Members(members),
            Reply::Killed { name, pid } => Outcome::Message {
                message: format!("killed {name} (pid {pid}) with SIGKILL"),
            },
            Reply::Done { message } | Reply::Progress { message } => Outcome::Message { message },
            Reply::Failed { message } => anyhow::bail!("{message}"),
        })
    }
}

/// The control socket of the cluster on `data_dir`.
fn socket_path(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let data_dir = std::path::absolute(data_dir)
        .with_context(|| format!("resolving {}", data_dir.display()))?;
    let socket = data_dir.join("cluster").join("control.sock");
    // sun_path holds 108 bytes on Linux.
    if socket.as_os_str().len() > 100 {
        bail!(
            "the data directory path is too long for a Unix socket ({}); use a shorter --data-dir",
            socket.display()
        );
    }
    Ok(socket)
}

async fn up(args: ClusterUpArgs, ca_cert: Option<PathBuf>) -> anyhow::Result<()> {
    let data_dir = &args.location.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let dir = data_dir.join("cluster");
    std::fs::create_dir_all(&dir)?;
    let socket = socket_path(&data_dir)?;
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        bail!(
            "a cluster is already running on {}: see `faafo cluster status --data-dir {}`",
            data_dir.display(),
            data_dir.display()
        );
    }
    let _ = std::fs::remove_file(&socket);
    let leftovers = supervisor::stop_leftovers(&dir).await;
    if leftovers > 0 {
        say(format_args!(
            "stopped {leftovers} member(s) left running by a supervisor that was killed"
        ));
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(certificate), Some(key)) => Some(members::Tls::new(
            certificate.clone(),
            key.clone(),
            ca_cert,
            supervisor::reachable(args.host),
        )?),
        _ => None,
    };
    let data_tier = if args.postgres_nodes > 0 {
        Some(DataTier {
            programs: Programs::find()?,
            secrets: postgres::Secrets::load_or_make(&dir.join("secrets.json"))?,
        })
    } else {
        None
    };
    let swift = if args.swift_nodes > 0 {
        members::check_swift()?;
        if args.swift_nodes < swift::REPLICAS {
            bail!(
                "--swift-nodes {} is fewer than the {} replicas Swift keeps of every object",
                args.swift_nodes,
                swift::REPLICAS
            );
        }
        let layout = swift::SwiftLayout {
            root: dir.join("swift"),
        };
        std::fs::create_dir_all(&layout.root)?;
        let hash_file = layout.root.join("hash");
        let hash_suffix = match std::fs::read_to_string(&hash_file) {
            Ok(hash) => hash.trim().to_owned(),
            Err(_) => {
                let hash = uuid::Uuid::new_v4().simple().to_string();
                postgres::write_private(&hash_file, &hash)?;
                hash
            }
        };
        Some(SwiftTier {
            layout,
            hash_suffix,
        })
    } else {
        None
    };
    let settings = Settings {
        exe: std::env::current_exe().context("finding the faafo binary")?,
        dir: dir.clone(),
        host: args.host,
        backing: faafo::Backing {
            // With the data tier, the supervisor fills these in once its ports are known.
            database_url: args
                .database_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("faafo.db").display())),
            patroni: Vec::new(),
            s3_credentials: false,
            object_store: args
                .object_store
                .clone()
                .unwrap_or_else(|| format!("file://{}", data_dir.join("images").display())),
            api_args: vec![
                format!("--lease-ms={}", args.lease_ms),
                format!("--max-attempts={}", args.max_attempts),
            ],
        },
        worker_token: format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ),
        gateway_port: args.gateway_port,
        api_port: args.api_port,
        etcd_port: args.etcd_port,
        postgres_port: args.postgres_port,
        swift_port: args.swift_port,
        data_tier,
        swift,
        tls,
        member_config: args
            .config
            .as_deref()
            .map(|path| {
                path.canonicalize()
                    .with_context(|| format!("--config {}", path.display()))
            })
            .transpose()?,
    };
    let supervisor = Supervisor::new(settings)?;
    if args.config.is_some() {
        supervisor
            .write_member_config()
            .await
            .map_err(|message| anyhow::anyhow!("{message}"))?;
    }
    let control = tokio::spawn(control::serve(listener, std::sync::Arc::clone(&supervisor)));
    let shutdown = shutdown_on_signal();
    let counts = [
        (
            Kind::Etcd,
            if args.postgres_nodes > 0 {
                etcd::MEMBERS
            } else {
                0
            },
        ),
        (Kind::Postgres, args.postgres_nodes),
        (Kind::SwiftRsync, u32::from(args.swift_nodes > 0)),
        (Kind::SwiftNode, args.swift_nodes),
        (
            Kind::SwiftProxy,
            if args.swift_nodes > 0 { args.apis } else { 0 },
        ),
        (Kind::Api, args.apis),
        (Kind::Gateway, args.gateways),
        (
            Kind::Worker,
            args.autoscale.map_or(args.workers, |range| {
                args.workers.clamp(range.min, range.max)
            }),
        ),
        (Kind::Probe, 1),
    ];
    let started = tokio::select! {
        started = supervisor.start(&counts) => started,
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(error) = started {
        supervisor.stop_all().await;
        let _ = std::fs::remove_file(&socket);
        return Err(error);
    }
    if args.autoscale.is_some() {
        supervisor.set_autoscale(
            args.autoscale,
            Duration::from_secs_f64(args.scale_down_after),
        );
    }
    tokio::spawn(std::sync::Arc::clone(&supervisor).autoscale());
    tokio::spawn(reload_on_hangup(std::sync::Arc::clone(&supervisor)));
    if let Err(error) = banner(&supervisor, &data_dir, &args) {
        // Nobody reads our output; the cluster runs all the same.
        tracing::warn!(%error, "cannot print the banner");
    }
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = supervisor.down.cancelled() => {}
    }
    say(format_args!("stopping every member..."));
    supervisor.stop_all().await;
    control.abort();
    let _ = std::fs::remove_file(&socket);
    say(format_args!("stopped"));
    Ok(())
}

/// SIGHUP to the supervisor does what `faafo cluster reload` does.
async fn reload_on_hangup(supervisor: std::sync::Arc<Supervisor>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reload with `faafo cluster reload`");
        return;
    };
    while hangups.recv().await.is_some() {
        match supervisor.reload_now().await {
            Ok(message) => say(format_args!("SIGHUP: {message}")),
            Err(message) => say(format_args!("SIGHUP: {message}")),
        }
    }
}

/// `root` and every process descended from it, from `/proc`.
pub fn process_tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name is in parentheses and may hold spaces: read after it.
            let after_name = &stat[stat.rfind(')')? + 1..];
            let ppid = after_name.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut tree = vec![root];
    let mut at = 0;
    while at < tree.len() {
        let parent = tree[at];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(pid, _)| *pid),
        );
        at += 1;
    }
    tree
}

/// Prints a line for whoever watches the supervisor. Its terminal or pipe may be gone (the
/// terminal closed, the program reading it killed): the supervisor goes on regardless,
/// since it must still stop its members.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Cancelled on SIGINT or SIGTERM: the supervisor then stops every member in order.
fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        cancel.cancel();
    });
    token
}

/// What `cluster up` prints once everything is ready; the first line names the
/// addresses to send requests to, comma-separated as `--endpoint-url` takes them.
fn banner(supervisor: &Supervisor, data_dir: &Path, args: &ClusterUpArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let gateways = supervisor.gateway_urls();
    let apis = supervisor.api_urls();
    let entry = if gateways.is_empty() {
        &apis
    } else {
        &gateways
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "faafo cluster: listening on {}", entry.join(","))?;
    writeln!(
        out,
        "{} gateway(s), {} API instance(s), {} worker(s); data in {}, logs in {}",
        args.gateways,
        args.apis,
        args.workers,
        data_dir.display(),
        data_dir.join("cluster").join("logs").display()
    )?;
    if args.postgres_nodes > 0 {
        writeln!(
            out,
            "database: PostgreSQL under Patroni, {} member(s) ({}), 3 etcd members",
            args.postgres_nodes,
            supervisor.patroni_urls().join(", ")
        )?;
    }
    if args.swift_nodes > 0 {
        writeln!(
            out,
            "images: OpenStack Swift, {} storage nodes, {} replicas, bucket {:?} through one S3 proxy per API instance",
            args.swift_nodes,
            swift::REPLICAS,
            swift::BUCKET
        )?;
    }
    for gateway in &gateways {
        writeln!(out, "  gateway {gateway}  (stats: {gateway}/__stats)")?;
    }
    for api in &apis {
        writeln!(out, "  api     {api}")?;
    }
    writeln!(
        out,
        "try: faafo --endpoint-url {} create --tasks 5",
        entry.join(",")
    )?;
    writeln!(
        out,
        "control from another terminal: faafo cluster status|stop|start|restart|scale|kill|chaos|down; Ctrl-C stops everything"
    )?;
    out.flush()?;
    Ok(())
}

async fn chaos(location: &Location, duration: Duration, interval: Duration) -> anyhow::Result<()> {
    let socket = socket_path(&location.data_dir)?;
    println!(
        "chaos: a random member gets SIGKILL every {:.1} s for {:.0} s",
        interval.as_secs_f64(),
        duration.as_secs_f64()
    );
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let (mut kills, mut skipped) = (0u32, 0u32);
    while started.elapsed() + interval <= duration {
        ticks.tick().await;
        let at = started.elapsed().as_secs_f64();
        match control::call(
            &socket,
            &Request::Kill {
                target: None,
                stay_down: false,
            },
            |_| {},
        )
        .await?
        {
            Reply::Killed { name, pid } => {
                kills += 1;
                println!("{at:6.1} s  killed {name} (pid {pid})");
            }
            Reply::Done { message } => {
                skipped += 1;
                println!("{at:6.1} s  {message}");
            }
            other => println!("{at:6.1} s  {other:?}"),
        }
    }
    println!("chaos: {kills} kill(s), {skipped} skipped while a member was restarting");
    Ok(())
}

/// What `cluster autoscale` sets.
#[derive(Debug, Clone, Copy)]
pub enum AutoscaleRule {
    Off,
    Workers(autoscale::Range),
}

fn parse_autoscale_range(text: &str) -> Result<autoscale::Range, String> {
    autoscale::parse_range(text, MAX_PER_ROLE)
}

/// `worker=MIN..MAX`, or `off`.
fn parse_autoscale(text: &str) -> Result<AutoscaleRule, String> {
    match text {
        "off" => Ok(AutoscaleRule::Off),
        rule => parse_autoscale_range(rule).map(AutoscaleRule::Workers),
    }
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds < 1e7 => Ok(seconds),
        _ => Err(format!(
            "expected a positive number of seconds, got {text:?}"
        )),
    }
}

fn parse_scale(text: &str) -> Result<(NodeRole, u32), String> {
    let (role, count) = text
        .split_once('=')
        .ok_or_else(|| format!("expected ROLE=COUNT (api=3), got {text:?}"))?;
    let role = match role {
        "gateway" | "gateways" => NodeRole::Gateway,
        "api" | "apis" => NodeRole::Api,
        "worker" | "workers" => NodeRole::Worker,
        other => {
            return Err(format!(
                "unknown role {other:?}: expected gateway, api or worker"
            ));
        }
    };
    let count: u32 = count
        .parse()
        .map_err(|_| format!("{count:?} is not a count"))?;
    let least = u32::from(role == NodeRole::Api);
    if !(least..=MAX_PER_ROLE).contains(&count) {
        return Err(format!(
            "{role} count must be {least} to {MAX_PER_ROLE}, got {count}"
        ));
    }
    Ok((role, count))
}

/// `60s`, `2m`, `500ms`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("expected a duration such as 60s, 2m or 500ms, got {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    if !(seconds.is_finite() && seconds > 0.0 && seconds < 1e7) {
        return Err(format!("{text:?} is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_arguments() {
        assert_eq!(parse_scale("api=3"), Ok((NodeRole::Api, 3)));
        assert_eq!(parse_scale("workers=0"), Ok((NodeRole::Worker, 0)));
        assert!(parse_scale("api=0").unwrap_err().contains("1 to 32"));
        assert!(parse_scale("db=1").unwrap_err().contains("unknown role"));
        assert!(parse_scale("api").unwrap_err().contains("ROLE=COUNT"));
        assert!(parse_scale("api=x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
