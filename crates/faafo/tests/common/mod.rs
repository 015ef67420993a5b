//! Running real `faafo` processes for tests: spawn on port 0, read the announced address,
//! kill with SIGKILL or SIGTERM, and wait on conditions with timeouts.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod load;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use faafo_client::{Client, RetryPolicy};
use faafo_core::wire::{CreateFractal, FractalView};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const TOKEN: &str = "process-test-token";

/// A `faafo` child process, killed when dropped.
pub struct Process {
    pub name: String,
    child: Child,
    /// `http://addr` for servers.
    pub url: Option<String>,
    pub log: PathBuf,
    /// Stop with SIGTERM (and a wait) rather than SIGKILL when dropped: a supervisor
    /// killed outright would leave its members running.
    graceful_drop: bool,
}

impl Process {
    /// Starts `faafo ARGS`, logging stderr to `DIR/NAME.log`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Process {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_faafo"))
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("FAAFO_ENDPOINT_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("the faafo binary starts");
        Process {
            name: name.to_owned(),
            child,
            url: None,
            log,
            graceful_drop: false,
        }
    }

    /// Starts a server and waits for the line announcing where it listens.
    pub fn spawn_server(dir: &Path, name: &str, args: &[&str]) -> Process {
        let mut process = Process::spawn(dir, name, args);
        let stdout = process.child.stdout.take().expect("piped stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = sender.send(line);
            }
            // Keep reading so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = receiver
            // A cluster with its data tier bootstraps PostgreSQL first.
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!(
                    "{name} did not announce its address; log:\n{}",
                    process.log_text()
                )
            });
        let url = line
            .split("listening on ")
            .nth(1)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        process.url = Some(url.trim().to_owned());
        process
    }

    pub fn url(&self) -> &str {
        self.url.as_deref().expect("a server process")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reap");
    }

    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGHUP: read the configuration again.
    pub fn hangup(&self) {
        self.signal(libc::SIGHUP);
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: sending a signal to our own child's pid has no memory-safety effect.
        let result = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(result, 0, "signal {signal} to {}", self.name);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit in {timeout:?}; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.graceful_drop && matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `faafo cluster up` on free ports with its data in `dir/data`; its url is the
/// comma-separated list of gateways. Dropping it stops the whole cluster.
pub fn spawn_cluster(
    dir: &Path,
    gateways: u32,
    apis: u32,
    workers: u32,
    extra: &[&str],
) -> Process {
    let data = dir.join("data");
    let (gateways, apis, workers) = (gateways.to_string(), apis.to_string(), workers.to_string());
    let mut args = vec![
        "cluster",
        "up",
        "--data-dir",
        data.to_str().expect("UTF-8 path"),
        "--gateway-port",
        "0",
        "--api-port",
        "0",
        "--gateways",
        &gateways,
        "--apis",
        &apis,
        "--workers",
        &workers,
    ];
    args.extend_from_slice(extra);
    let mut cluster = Process::spawn_server(dir, "cluster", &args);
    cluster.graceful_drop = true;
    cluster
}

/// Runs `faafo ARGS` to its end: its exit status, stdout and stderr.
pub async fn faafo_output(args: &[&str]) -> (ExitStatus, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_faafo"))
        .args(args)
        .env_remove("FAAFO_ENDPOINT_URL")
        .output()
        .await
        .expect("faafo runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `faafo ARGS` to its end; returns its stdout, failing the test on a non-zero exit.
pub async fn run_faafo(args: &[&str]) -> String {
    let (status, stdout, stderr) = faafo_output(args).await;
    assert!(
        status.success(),
        "faafo {args:?} failed: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

/// The value of the sample `name` (with its labels, as printed) on a Prometheus page.
pub fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The sample `name` of the metrics page at `url`; `None` when absent or unreachable.
pub async fn scrape(url: &str, name: &str) -> Option<f64> {
    let page = reqwest::get(url).await.ok()?.text().await.ok()?;
    sample(&page, name)
}

/// `faafo api` on port 0 over the database and images in `dir`.
pub fn spawn_api(dir: &Path, name: &str, extra: &[&str]) -> Process {
    spawn_api_on(
        dir,
        name,
        &format!("sqlite://{}", dir.join("faafo.db").display()),
        extra,
    )
}

/// `faafo api` on port 0 over the database at `database` and the images in `dir`.
pub fn spawn_api_on(dir: &Path, name: &str, database: &str, extra: &[&str]) -> Process {
    let images = format!("file://{}", dir.join("images").display());
    spawn_api_with(dir, name, database, &images, extra)
}

/// `faafo api` on port 0 over the database at `database` and the object store `images`.
pub fn spawn_api_with(
    dir: &Path,
    name: &str,
    database: &str,
    images: &str,
    extra: &[&str],
) -> Process {
    let mut args = vec![
        "api",
        "--bind",
        "127.0.0.1:0",
        "--database-url",
        &database,
        "--object-store",
        images,
    ];
    args.extend_from_slice(&["--worker-token", TOKEN]);
    args.extend_from_slice(extra);
    Process::spawn_server(dir, name, &args)
}

/// `faafo up` on port 0 with `workers` workers, keeping its data in `dir/data`.
pub fn spawn_up(dir: &Path, name: &str, workers: u32) -> Process {
    let data = dir.join("data");
    let workers = workers.to_string();
    let args = [
        "up",
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("UTF-8 path"),
        "--workers",
        &workers,
    ];
    Process::spawn_server(dir, name, &args)
}

pub fn spawn_worker(dir: &Path, name: &str, endpoints: &str) -> Process {
    Process::spawn(
        dir,
        name,
        &[
            "worker",
            "--endpoint-url",
            endpoints,
            "--worker-token",
            TOKEN,
            "--name",
            name,
        ],
    )
}

pub fn client(endpoints: &str) -> Client {
    Client::new(endpoints, RetryPolicy::default()).expect("valid endpoints")
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn wait_for_state(
    client: &Client,
    uuid: Uuid,
    state: faafo_core::FractalState,
    timeout: Duration,
) -> FractalView {
    wait_for(
        &format!("fractal {uuid} to be {state}"),
        timeout,
        || async {
            client
                .get(uuid)
                .await
                .ok()
                .filter(|view| view.state == state)
        },
    )
    .await
}

/// Waits until the fractal is done, then checks its image against its record.
pub async fn done_and_intact(client: &Client, uuid: Uuid) -> FractalView {
    let done = wait_for_state(
        client,
        uuid,
        faafo_core::FractalState::Done,
        Duration::from_secs(30),
    )
    .await;
    verify_image(client, &done).await;
    done
}

/// A render that takes seconds even on every core with the SIMD kernel: every pixel of
/// the window stays in the filled Julia set of c = -1, so it runs all its iterations
/// (600 x 600 x `iterations`).
pub fn slow_fractal(iterations: u32) -> CreateFractal {
    CreateFractal {
        uuid: Some(Uuid::new_v4()),
        width: 600,
        height: 600,
        iterations,
        xa: -0.05,
        xb: 0.05,
        ya: -0.05,
        yb: 0.05,
        cx: Some(-1.0),
        cy: Some(0.0),
    }
}

pub fn small_fractal() -> CreateFractal {
    CreateFractal {
        uuid: Some(Uuid::new_v4()),
        width: 120,
        height: 90,
        iterations: 128,
        xa: -2.0,
        xb: 2.0,
        ya: -1.5,
        yb: 1.5,
        cx: None,
        cy: None,
    }
}

/// Downloads the image of a done fractal and checks it against its record.
pub async fn verify_image(client: &Client, view: &FractalView) {
    let png = client.image(view.uuid).await.expect("image download");
    assert_eq!(
        Some(hex::encode(Sha256::digest(&png))),
        view.checksum,
        "checksum of {}",
        view.uuid
    );
    assert_eq!(Some(png.len() as u64), view.size);
    assert_eq!(
        faafo_render::png_dimensions(&png).unwrap(),
        (view.width, view.height)
    );
}

/// The value of a counter in a server's `/metrics`, 0 when absent.
pub async fn metric(url: &str, name: &str) -> u64 {
    let Ok(response) = reqwest::get(format!("{url}/metrics")).await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .map_or(0, |value| value as u64)
}
