//! Command-line interface: flags, environment variables and dispatch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use faafo_core::{Limits, WorkerToken};

use uuid::Uuid;

use crate::{bench, client_cli, render_cli, roles, tables};

/// Fractals as a Service: Julia-set images rendered by a fleet of workers.
#[derive(Debug, Parser)]
#[command(name = "faafo", version, propagate_version = true)]
pub struct Cli {
    /// API endpoints to talk to, comma-separated; the client fails over between them.
    #[arg(
        long,
        global = true,
        help_heading = CLIENT_HEADING,
        env = "FAAFO_ENDPOINT_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub endpoint_url: String,

    /// Print JSON instead of tables.
    #[arg(long, global = true, help_heading = CLIENT_HEADING)]
    pub json: bool,

    /// Give up on a request after trying every endpoint for this many seconds (the
    /// default outlasts a failover of the database's leader).
    #[arg(long, global = true, env = "FAAFO_TIMEOUT", default_value_t = faafo_client::DEFAULT_TOTAL.as_secs_f64(), value_parser = positive_seconds, help_heading = CLIENT_HEADING)]
    pub timeout: f64,

    /// Trust the certificates in this PEM file (a CA, or a server's own certificate)
    /// besides the system's: for https:// endpoints and backends, and for PostgreSQL
    /// with sslmode=verify-full when the URL names no sslrootcert.
    #[arg(long, global = true, env = "FAAFO_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// The API key this client sends (`Authorization: Bearer`): the service counts its
    /// creates and queued work by it rather than by address.
    #[arg(long, global = true, env = "FAAFO_API_KEY", hide_env_values = true, help_heading = CLIENT_HEADING)]
    pub api_key: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

/// The global flags only a client uses, and the subcommands that use each: a
/// configuration file of another role may not set them, and `--print-config` leaves
/// them out.
pub const CLIENT_FLAGS: [(&str, &[&str]); 4] = [
    (
        "endpoint_url",
        &[
            "create", "list", "show", "get", "delete", "status", "probe", "worker",
        ],
    ),
    (
        "timeout",
        &[
            "create", "list", "show", "get", "delete", "status", "probe", "worker",
        ],
    ),
    (
        "json",
        &[
            "create", "list", "show", "get", "delete", "status", "probe", "cluster", "bench",
        ],
    ),
    (
        "api_key",
        &["create", "list", "show", "get", "delete", "status", "probe"],
    ),
];

/// Where `--help` lists the flags of the client commands.
const CLIENT_HEADING: &str = "Client options (create, list, show, get, delete, status, probe; worker: --endpoint-url, --timeout)";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask for fractals: fixed sizes and windows, or random ones in the given ranges.
    Create(client_cli::CreateArgs),
    /// List every fractal.
    List,
    /// Show one fractal's parameters and state.
    Show {
        /// The fractal's uuid.
        uuid: Uuid,
    },
    /// Download a fractal's PNG and verify its checksum.
    Get {
        /// The fractal's uuid.
        uuid: Uuid,
        /// Where to write it (default UUID.png; - for stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Delete a fractal and its image, cancelling its render.
    Delete {
        /// The fractal's uuid.
        uuid: Uuid,
    },
    /// Run the whole service on this machine: the API and workers in one process, on an
    /// embedded database and image directory. Nothing to set up.
    Up(UpArgs),
    /// Run one API server.
    Api(ApiArgs),
    /// Run one worker, taking tasks from the API endpoints.
    Worker(WorkerArgs),
    /// Run a health-checked load balancer in front of API instances.
    Gateway(GatewayArgs),
    /// Show every node of the deployment (gateways, APIs, workers) and the queue.
    Status,
    /// Watch the service as a user would: create a small fractal, wait for it, download
    /// it, check it against a local render, delete it; every --interval, or --once.
    Probe(crate::probe::ProbeArgs),
    /// Run and control the whole topology on this machine: gateways, API instances and
    /// workers under a supervisor.
    #[command(subcommand)]
    Cluster(faafo_cluster::ClusterCommand),
    /// Render one fractal locally, without a server.
    Render(render_cli::RenderArgs),
    /// Measure the service.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// `--config` and `--print-config`, read by `config_file` before the role starts.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Read settings from this TOML file: its keys are the long flag names
    /// (max-width = 2000). Flags and FAAFO_* variables override it.
    #[arg(long, env = "FAAFO_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration, saying where each setting comes from (secrets
    /// hidden), and exit.
    #[arg(long)]
    pub print_config: bool,
    /// What to log: a level (error, warn, info, debug, trace) or RUST_LOG-style
    /// directives (info,faafo_api=debug). Default: RUST_LOG, else info.
    #[arg(long, env = "FAAFO_LOG_LEVEL")]
    pub log_level: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Where to listen.
    #[arg(long, env = "FAAFO_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// Where the database and the images are kept.
    #[arg(long, env = "FAAFO_DATA_DIR", default_value = "./faafo-data")]
    pub data_dir: PathBuf,
    /// Render workers to run (default: one per core).
    #[arg(long, env = "FAAFO_WORKERS")]
    pub workers: Option<usize>,
    /// Run a probe in this process: every this many seconds it makes, fetches and checks
    /// a small fractal as a user would (and deletes it), and /status shows the outcome.
    /// Off by default (0), since its fractal shows in the gallery while it lives.
    #[arg(long, env = "FAAFO_PROBE_INTERVAL", default_value_t = 0.0, value_parser = non_negative)]
    pub probe_interval: f64,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub tuning: ApiTuning,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Where to listen (port 0 picks a free port; the address is printed first).
    #[arg(long, env = "FAAFO_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The store: sqlite:///path/to/faafo.db (or sqlite:relative/path.db), or PostgreSQL:
    /// postgres://user@host1:5432,host2:5432/faafo?target_session_attrs=read-write
    /// (several hosts: the one that accepts writes is used, and found again after a failover).
    /// TLS as libpq reads it: sslmode=verify-full (or verify-ca, require) and
    /// sslrootcert=PATH|system; without sslrootcert, the system's roots and --ca-cert.
    #[arg(long, env = "FAAFO_DATABASE_URL")]
    pub database_url: String,
    /// Where images are kept: file:///absolute/directory, or an S3-compatible store,
    /// s3://BUCKET[/PREFIX]?endpoint=http://host:port&region=us-east-1, with the
    /// credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = "FAAFO_OBJECT_STORE")]
    pub object_store: String,
    /// The secret workers must present.
    #[arg(long, env = "FAAFO_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: String,
    /// PostgreSQL only: no LISTEN/NOTIFY wake-ups, polling alone (for poolers such as
    /// PgBouncer in transaction mode, where LISTEN does not work).
    #[arg(long, env = "FAAFO_POLL_ONLY")]
    pub poll_only: bool,
    /// PostgreSQL run by Patroni: the members' REST APIs, comma-separated
    /// (http://db1:8008,http://db2:8008,http://db3:8008). Writes then go only to the leader
    /// Patroni elected, at the address it advertises (the user, password and database come
    /// from --database-url), and stop within 4 s of its election no longer being confirmed.
    #[arg(long, env = "FAAFO_PATRONI", value_delimiter = ',')]
    pub patroni: Vec<String>,
    /// The URL clients reach this instance at, listed in /v1/endpoints (default: the
    /// --bind address, or this host's name when bound to every interface).
    #[arg(long, env = "FAAFO_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// On SIGTERM, keep serving this long after /readyz turns 503, so load balancers stop
    /// sending before the listener closes.
    #[arg(long, env = "FAAFO_DRAIN_DELAY_MS", default_value_t = 1000)]
    pub drain_delay_ms: u64,
    #[command(flatten)]
    pub tuning: ApiTuning,
}

/// Settings shared by `api` and `up`.
#[derive(Debug, Args)]
pub struct ApiTuning {
    /// How long a task's lease lasts without a heartbeat, in milliseconds.
    #[arg(long, env = "FAAFO_LEASE_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub lease_ms: u64,
    /// How often expired leases are swept, in milliseconds.
    #[arg(long, env = "FAAFO_SWEEP_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..))]
    pub sweep_interval_ms: u64,
    /// How many times a task may be leased before the fractal is failed.
    #[arg(long, env = "FAAFO_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// The longest a worker's lease request is held open waiting for work, in
    /// milliseconds (below the idle timeout of any proxy between workers and the API).
    #[arg(long, env = "FAAFO_MAX_LEASE_WAIT_MS", default_value_t = 30_000)]
    pub max_lease_wait_ms: u64,
    /// Widest fractal a client may ask for, in pixels.
    #[arg(long, env = "FAAFO_MAX_WIDTH", default_value_t = Limits::default().max_width)]
    pub max_width: u32,
    /// Tallest fractal a client may ask for, in pixels.
    #[arg(long, env = "FAAFO_MAX_HEIGHT", default_value_t = Limits::default().max_height)]
    pub max_height: u32,
    /// Most iterations a client may ask for.
    #[arg(long, env = "FAAFO_MAX_ITERATIONS", default_value_t = Limits::default().max_iterations)]
    pub max_iterations: u32,
    /// Upper bound of width * height * iterations.
    #[arg(long, env = "FAAFO_MAX_WORK", default_value_t = Limits::default().max_work)]
    pub max_work: f64,
    /// Creates a second each client may make, in bursts of as many; past it, 429 with
    /// Retry-After (0: no limit). Counted per API instance.
    #[arg(long, env = "FAAFO_CREATE_RATE", default_value_t = 200.0, value_parser = non_negative)]
    pub create_rate: f64,
    /// Largest sum of width * height * iterations of one client's unfinished (queued or
    /// running) fractals; past it, 429 (0: no limit). The default is 20 of the largest.
    #[arg(long, env = "FAAFO_MAX_QUEUED_WORK", default_value_t = 20.0 * Limits::default().max_work, value_parser = non_negative)]
    pub max_queued_work: f64,
    /// API keys clients may send (`Authorization: Bearer KEY`), comma-separated; a key
    /// names its client for the limits and the fair queue. Without the list any key is
    /// taken, and a request without one is counted against its address.
    #[arg(
        long,
        env = "FAAFO_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Proxies whose X-Forwarded-For names the client (gateways, load balancers):
    /// addresses or blocks, comma-separated.
    #[arg(
        long,
        env = "FAAFO_TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1"
    )]
    pub trusted_proxies: Vec<faafo_api::IpNet>,
    /// Storage servers the status page checks and shows (Swift's object servers, or
    /// anything answering GET /healthcheck): http://host:port, comma-separated.
    #[arg(long, env = "FAAFO_STORAGE_NODES", value_delimiter = ',')]
    pub storage_nodes: Vec<String>,
}

impl ApiTuning {
    pub fn config(&self, worker_token: WorkerToken) -> faafo_api::ApiConfig {
        let mut config = faafo_api::ApiConfig::new(worker_token);
        config.lease = Duration::from_millis(self.lease_ms);
        config.sweep_interval = Duration::from_millis(self.sweep_interval_ms);
        config.max_attempts = self.max_attempts;
        config.max_lease_wait = Duration::from_millis(self.max_lease_wait_ms);
        config.limits = Limits {
            max_width: self.max_width,
            max_height: self.max_height,
            max_iterations: self.max_iterations,
            max_work: self.max_work,
        };
        let positive = |value: f64| (value > 0.0).then_some(value);
        config.clients = faafo_api::ClientPolicy {
            api_keys: self
                .api_keys
                .iter()
                .map(|key| faafo_api::ClientPolicy::digest(key.trim()))
                .collect(),
            trusted_proxies: self.trusted_proxies.clone(),
            create_rate: positive(self.create_rate),
            max_queued_work: positive(self.max_queued_work),
        };
        config.storage_nodes = self
            .storage_nodes
            .iter()
            .map(|url| url.trim().trim_end_matches('/').to_owned())
            .collect();
        config
    }
}

/// HTTPS for a server: both or neither.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM), with --tls-key.
    #[arg(long, env = "FAAFO_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "FAAFO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Where to listen (port 0 picks a free port; the address is printed first).
    #[arg(long, env = "FAAFO_GATEWAY_BIND", default_value = "127.0.0.1:9100")]
    pub bind: SocketAddr,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// An API instance to balance over (repeat the flag, or separate with commas).
    #[arg(
        long = "backend",
        env = "FAAFO_GATEWAY_BACKENDS",
        value_delimiter = ','
    )]
    pub backends: Vec<String>,
    /// How often each backend's /readyz is checked, in milliseconds.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..))]
    pub check_interval_ms: u64,
    /// Secret for adding and removing backends at run time (POST/DELETE /__backends).
    #[arg(long, env = "FAAFO_GATEWAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Follow the API instances the membership lists (GET /v1/endpoints on a backend,
    /// every second): the --backend URLs are then only the first contact.
    #[arg(long, env = "FAAFO_GATEWAY_DISCOVER")]
    pub discover: bool,
    /// With it, the gateway announces itself in the membership, so that clients
    /// discover it.
    #[arg(long, env = "FAAFO_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// The URL clients reach this gateway at (default: the --bind address, or this host's
    /// name when bound to every interface).
    #[arg(long, env = "FAAFO_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The secret the API expects from workers.
    #[arg(long, env = "FAAFO_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: String,
    /// Recorded as `generated_by` (default: host name and process id).
    #[arg(long, env = "FAAFO_WORKER_NAME")]
    pub name: Option<String>,
}

impl Cli {
    /// The `--log-level` of a long-running role.
    pub fn log_level(&self) -> Option<&str> {
        let config = match &self.command {
            Command::Api(args) => &args.config,
            Command::Gateway(args) => &args.config,
            Command::Worker(args) => &args.config,
            Command::Up(args) => &args.config,
            Command::Probe(args) => &args.config,
            _ => return None,
        };
        config.log_level.as_deref()
    }
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        let output = client_cli::Output { json: self.json };
        let ca = self
            .ca_cert
            .as_deref()
            .map(crate::tls::ca_certificates)
            .transpose()
            .context("--ca-cert")?;
        let client = || {
            client_cli::client(
                &self.endpoint_url,
                Duration::from_secs_f64(self.timeout),
                ca.as_deref(),
                self.api_key.as_deref(),
            )
        };
        match self.command {
            Command::Create(args) => client_cli::create(&client()?, &args, &output).await,
            Command::List => client_cli::list(&client()?, &output).await,
            Command::Show { uuid } => client_cli::show(&client()?, uuid, &output).await,
            Command::Get { uuid, output: file } => {
                client_cli::get(&client()?, uuid, file, &output).await
            }
            Command::Delete { uuid } => client_cli::delete(&client()?, uuid, &output).await,
            Command::Up(args) => roles::up(args).await,
            Command::Api(args) => roles::api(args, ca).await,
            Command::Worker(args) => roles::worker(&self.endpoint_url, ca.as_deref(), args).await,
            Command::Gateway(args) => roles::gateway(args, ca).await,
            Command::Status => client_cli::status(&client()?, &output).await,
            Command::Probe(args) => crate::probe::run(client()?, args, &output).await,
            Command::Cluster(command) => {
                let json = output.json;
                let outcome = command
                    .run(self.ca_cert.clone(), |progress| {
                        if !json {
                            println!("{progress}");
                        }
                    })
                    .await?;
                match outcome {
                    faafo_cluster::Outcome::Nothing => Ok(()),
                    outcome if json => client_cli::print_json(&outcome),
                    faafo_cluster::Outcome::Members(members) => {
                        print!("{}", tables::cluster_members(&members));
                        Ok(())
                    }
                    faafo_cluster::Outcome::Message { message } => {
                        println!("{message}");
                        Ok(())
                    }
                }
            }
            Command::Render(args) => render_cli::render(&args),
            Command::Bench(command) => command.run(output.json).await,
        }
    }
}

fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(format!("expected a number, 0 or more, got {text:?}")),
    }
}

pub(crate) fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err(format!(
            "expected a positive number of seconds, got {text:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// Every flag of every command says what it does in `--help`.
    #[test]
    fn every_flag_has_a_sentence() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<super::Cli as clap::CommandFactory>::command(),
            "faafo",
            &mut missing,
        );
        assert!(missing.is_empty(), "flags without help: {missing:#?}");
    }
}
