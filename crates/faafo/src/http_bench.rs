//! `faafo bench http`: the HTTP tiers under `wrk`, each beside haproxy doing the same job
//! on the same machine in the same run, so the ratios hold on a noisy machine.
//!
//! Two API instances run in this process on one SQLite file with tiny fractals rendered
//! beforehand; `faafo gateway` and haproxy run as child processes. Measured: one done
//! fractal (`GET /v1/fractal/UUID`) against haproxy answering its very bytes from
//! memory (`http-request return`), the first page of the list, and one fractal through
//! the gateway against haproxy (leastconn, the same health check) in front of the same
//! two instances. Every tier is measured once per round, in turn (`--rounds`); the
//! figures are the rounds' medians, and each ratio the median of the rounds' ratios, whose
//! two sides were measured a few seconds apart on the same machine.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use faafo_client::{Client, RetryPolicy};
use faafo_core::FractalState;
use faafo_core::wire::CreateFractal;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bench_report::{Report, median};
use crate::roles::{Backing, LocalService};

#[derive(Debug, Args)]
pub struct HttpBenchArgs {
    /// Seconds of load in each measurement.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=600))]
    duration: u32,
    /// Connections wrk keeps open.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: u32,
    /// wrk's threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Rounds of measurements: each measures every tier once, in turn, and the figures
    /// are the rounds' medians (a ratio, the median of the rounds' ratios).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Done fractals in the database while measuring.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    fractals: u32,
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
struct Load {
    requests: u64,
    requests_per_s: f64,
    p50: Duration,
    p99: Duration,
}

/// One thing measured: where wrk sends its requests and, for a balancer, the process
/// whose CPU time is counted.
struct Tier {
    key: &'static str,
    label: &'static str,
    url: String,
    pid: Option<u32>,
    /// Each round's load, and the CPU per request of `pid`.
    rounds: Vec<(Load, Option<f64>)>,
}

impl Tier {
    fn new(key: &'static str, label: &'static str, url: String, pid: Option<u32>) -> Tier {
        Tier {
            key,
            label,
            url,
            pid,
            rounds: Vec::new(),
        }
    }

    fn median(&self, figure: impl Fn(&Load) -> f64) -> f64 {
        median(
            &self
                .rounds
                .iter()
                .map(|(load, _)| figure(load))
                .collect::<Vec<_>>(),
        )
    }
}

/// The tier measured under `key`.
fn tier<'t>(tiers: &'t [Tier], key: &str) -> &'t Tier {
    tiers
        .iter()
        .find(|tier| tier.key == key)
        .expect("every tier compared is measured")
}

pub async fn run(args: HttpBenchArgs, report: &mut Report) -> anyhow::Result<()> {
    check_tool("wrk", &["--version"], "wrk")?;
    let haproxy = check_tool("haproxy", &["-v"], "haproxy").is_ok();
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let shutdown = CancellationToken::new();
    let mut instances = Vec::new();
    for workers in [1, 0] {
        let backing = Backing::embedded(&scratch.path().join("data")).await?;
        let config = faafo_api::ApiConfig::new(faafo_core::WorkerToken::new("bench"));
        let bind: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        instances.push(
            LocalService::start(bind, None, backing, workers, config, None, shutdown.clone())
                .await?,
        );
    }
    let urls: Vec<String> = instances
        .iter()
        .map(|instance| format!("http://{}", instance.listener_address))
        .collect();
    let uuid = fill(&urls[0], args.fractals).await?;
    let one = format!("/v1/fractal/{uuid}");
    let body = reqwest::get(format!("{}{one}", urls[0]))
        .await?
        .error_for_status()?
        .bytes()
        .await?;

    let port = free_port()?;
    let gateway_process = ChildGuard(
        Command::new(std::env::current_exe()?)
            .args(["gateway", "--log-level", "warn", "--bind"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--backend")
            .arg(urls.join(","))
            .stdout(Stdio::null())
            .spawn()
            .context("starting faafo gateway")?,
    );
    let mut tiers = vec![
        Tier::new(
            "one_fractal",
            "GET one fractal",
            format!("{}{one}", urls[0]),
            None,
        ),
        Tier::new(
            "list",
            "GET the list (page 1, 10 a page)",
            format!("{}/v1/fractal", urls[0]),
            None,
        ),
        Tier::new(
            "gateway",
            "GET one fractal through faafo gateway",
            format!("http://127.0.0.1:{port}{one}"),
            Some(gateway_process.0.id()),
        ),
    ];
    serving_both(&tier(&tiers, "gateway").url, 2)
        .await
        .context("faafo gateway")?;
    // Kept alive for the whole run, so that the rounds can alternate.
    let mut haproxies = Vec::new();
    if haproxy {
        let body_file = scratch.path().join("fractal.json");
        std::fs::write(&body_file, &body)?;
        let fixed =
            Haproxy::start(&fixed_answer_config(&body_file), scratch.path(), "fixed").await?;
        tiers.push(Tier::new(
            "haproxy_fixed_answer",
            "haproxy answering the same bytes",
            format!("http://127.0.0.1:{}{one}", fixed.port),
            None,
        ));
        let balancer =
            Haproxy::start(&balancer_config(&instances), scratch.path(), "balancer").await?;
        tiers.push(Tier::new(
            "haproxy_balancer",
            "GET one fractal through haproxy",
            format!("http://127.0.0.1:{}{one}", balancer.port),
            Some(balancer.process.0.id()),
        ));
        serving_both(&tier(&tiers, "haproxy_balancer").url, 2)
            .await
            .context("haproxy")?;
        haproxies.extend([fixed, balancer]);
    }

    report.say(format!(
        "faafo bench http: wrk -t{} -c{} -d{}s, {} done fractals in SQLite, everything on this machine",
        args.threads, args.connections, args.duration, args.fractals
    ));
    report.say(format!(
        "  {} rounds, each measuring every tier in turn; the figures are the rounds' medians",
        args.rounds
    ));
    for _ in 0..args.rounds {
        for tier in &mut tiers {
            let measured = match tier.pid {
                Some(pid) => with_cpu_of(pid, run_wrk(tier.url.clone(), &args)).await?,
                None => (run_wrk(tier.url.clone(), &args).await?, None),
            };
            tier.rounds.push(measured);
        }
    }

    report.say("                                          requests/s    p50 ms    p99 ms");
    report.figure("rounds", args.rounds);
    for tier in &tiers {
        let (rate, p50, p99) = (
            tier.median(|load| load.requests_per_s),
            tier.median(|load| load.p50.as_secs_f64() * 1e3),
            tier.median(|load| load.p99.as_secs_f64() * 1e3),
        );
        report.say(format!(
            "  {:<38} {rate:>10.0}  {p50:>8.2}  {p99:>8.2}",
            tier.label
        ));
        report.figure(&format!("{}.requests_per_s", tier.key), rate);
        report.figure(&format!("{}.p50_ms", tier.key), p50);
        report.figure(&format!("{}.p99_ms", tier.key), p99);
    }
    if haproxy {
        // Each ratio is of two measurements made one after the other, so a change in
        // what else the machine was doing shifts both; the median of those is reported.
        let ratios = |ours: &Tier, theirs: &Tier, figure: fn(&Load) -> f64| -> Vec<f64> {
            ours.rounds
                .iter()
                .zip(&theirs.rounds)
                .map(|((ours, _), (theirs, _))| figure(ours) / figure(theirs))
                .collect()
        };
        let (one, fixed) = (
            tier(&tiers, "one_fractal"),
            tier(&tiers, "haproxy_fixed_answer"),
        );
        let (gateway, balancer) = (tier(&tiers, "gateway"), tier(&tiers, "haproxy_balancer"));
        let one_share = ratios(one, fixed, |load| load.requests_per_s);
        let gateway_share = ratios(gateway, balancer, |load| load.requests_per_s);
        let p99s = ratios(gateway, balancer, |load| load.p99.as_secs_f64());
        report.say(format!(
            "  one fractal: {:.0}% of haproxy's fixed answer; gateway: {:.2}x haproxy's throughput (rounds: {}), p99 {:.2}x haproxy's",
            median(&one_share) * 100.0,
            median(&gateway_share),
            gateway_share
                .iter()
                .map(|share| format!("{share:.2}x"))
                .collect::<Vec<_>>()
                .join(" "),
            median(&p99s),
        ));
        let cpu =
            |tier: &Tier| -> Option<Vec<f64>> { tier.rounds.iter().map(|(_, cpu)| *cpu).collect() };
        if let (Some(ours), Some(theirs)) = (cpu(gateway), cpu(balancer)) {
            // What each balancer itself spent: unlike requests/s, this does not depend on
            // what else the machine was busy with.
            let (ours, theirs) = (median(&ours), median(&theirs));
            report.say(format!(
                "  CPU per proxied request: faafo gateway {:.1} us, haproxy {:.1} us ({:.2}x)",
                ours * 1e6,
                theirs * 1e6,
                ours / theirs
            ));
            report.figure("gateway.cpu_us_per_request", ours * 1e6);
            report.figure("haproxy_balancer.cpu_us_per_request", theirs * 1e6);
        }
        report.figure(
            "one_fractal.share_of_haproxy_fixed_answer",
            median(&one_share),
        );
        report.figure("gateway.share_of_haproxy_balancer", median(&gateway_share));
        report.figure("gateway.p99_relative_to_haproxy", median(&p99s));
    } else {
        report.say("  (haproxy is not installed: no comparisons; Debian: apt-get install haproxy)");
    }
    // The balancers stop before the instances they check.
    drop((gateway_process, haproxies));
    shutdown.cancel();
    for instance in instances {
        instance.wait().await?;
    }
    Ok(())
}

/// Creates `count` tiny fractals through `url` and waits until all are done; returns one.
async fn fill(url: &str, count: u32) -> anyhow::Result<Uuid> {
    let client = Arc::new(Client::new(url, RetryPolicy::default())?);
    let creators: Vec<_> = (0..8)
        .map(|creator| {
            let client = Arc::clone(&client);
            tokio::spawn(async move {
                let mut uuids = Vec::new();
                for _ in (creator..count).step_by(8) {
                    let request = CreateFractal {
                        uuid: Some(Uuid::new_v4()),
                        width: 32,
                        height: 32,
                        iterations: 32,
                        xa: -2.0,
                        xb: 2.0,
                        ya: -2.0,
                        yb: 2.0,
                        cx: None,
                        cy: None,
                    };
                    uuids.push(client.create(&request).await?.uuid);
                }
                anyhow::Ok(uuids)
            })
        })
        .collect();
    let mut uuids = Vec::new();
    for creator in creators {
        uuids.extend(creator.await.context("a creator panicked")??);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    for &uuid in &uuids {
        loop {
            let fractal = client.get(uuid).await?;
            match fractal.state {
                FractalState::Done => break,
                FractalState::Failed => bail!("fractal {uuid} failed: {:?}", fractal.error),
                _ if Instant::now() > deadline => bail!("the fractals were not done in 10 minutes"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    Ok(uuids[0])
}

/// Fails with a clear message when `program` cannot be run.
fn check_tool(program: &str, args: &[&str], package: &str) -> anyhow::Result<()> {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|_| ())
        .with_context(|| {
            format!(
                "faafo bench http needs {program} on the PATH (Debian: apt-get install {package})"
            )
        })
}

/// Runs wrk against `url` and reads its figures.
async fn run_wrk(url: String, args: &HttpBenchArgs) -> anyhow::Result<Load> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections.max(args.threads)))
        .arg(format!("-d{}s", args.duration))
        .arg("--latency")
        .arg(&url)
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed on {url}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output for {url}:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<Load> {
    if text.contains("Non-2xx or 3xx responses") {
        return None;
    }
    let after = |label: &str| {
        text.lines()
            .find_map(|line| line.trim_start().strip_prefix(label))
            .map(str::trim)
    };
    let latency = |label: &str| parse_duration(after(label)?.split_whitespace().next()?);
    let requests = text
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))?
        .0
        .parse()
        .ok()?;
    Some(Load {
        requests,
        requests_per_s: after("Requests/sec:")?.parse().ok()?,
        p50: latency("50%")?,
        p99: latency("99%")?,
    })
}

/// wrk's durations: `812.00us`, `2.08ms`, `1.10s`.
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// A port free a moment ago, for a child process to bind.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits (up to 20 s) until `url` has answered 200 `times` times in a row, so that a
/// balancer has both backends up before it is measured.
async fn serving_both(url: &str, times: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut in_a_row = 0;
    // Health checks bring a backend up after two good answers 250 ms apart.
    tokio::time::sleep(Duration::from_millis(600)).await;
    while in_a_row < times * 4 {
        match reqwest::get(url).await {
            Ok(response) if response.status().is_success() => in_a_row += 1,
            _ => in_a_row = 0,
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn fixed_answer_config(body: &Path) -> String {
    format!(
        "frontend fixed\n    bind 127.0.0.1:{{port}}\n    http-request return status 200 content-type application/json file {}\n",
        body.display()
    )
}

fn balancer_config(instances: &[LocalService]) -> String {
    let mut config = String::from(
        "frontend balancer\n    bind 127.0.0.1:{port}\n    default_backend apis\n\
         backend apis\n    balance leastconn\n    option httpchk GET /readyz\n",
    );
    for (index, instance) in instances.iter().enumerate() {
        config.push_str(&format!(
            "    server api{index} {} check inter 250 fall 2 rise 2\n",
            instance.listener_address
        ));
    }
    config
}

/// Runs `load` and says how much CPU process `pid` spent per request meanwhile, in
/// seconds (None where /proc cannot tell).
async fn with_cpu_of(
    pid: u32,
    load: impl std::future::Future<Output = anyhow::Result<Load>>,
) -> anyhow::Result<(Load, Option<f64>)> {
    let before = cpu_time(pid);
    let load = load.await?;
    let spent = match (before, cpu_time(pid)) {
        (Some(before), Some(after)) if load.requests > 0 => {
            Some((after - before) / load.requests as f64)
        }
        _ => None,
    };
    Ok((load, spent))
}

/// The CPU time process `pid` has used so far (user and system), in seconds.
fn cpu_time(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces): state, then 10
    // fields, then utime and stime in clock ticks.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: f64 = fields.next()?.parse::<f64>().ok()? + fields.next()?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks / per_second as f64)
}

/// A haproxy process running one configuration section.
struct Haproxy {
    process: ChildGuard,
    port: u16,
}

impl Haproxy {
    /// Starts haproxy with `section` (whose `{port}` is filled in), its configuration
    /// written into `dir` under `name`, and waits until it listens.
    async fn start(section: &str, dir: &Path, name: &str) -> anyhow::Result<Haproxy> {
        let port = free_port()?;
        let config = format!(
            "defaults\n    mode http\n    timeout client 30s\n    timeout server 30s\n    timeout connect 2s\n{}",
            section.replace("{port}", &port.to_string())
        );
        let file = dir.join(format!("haproxy-{name}.cfg"));
        std::fs::write(&file, config)?;
        let process = ChildGuard(
            Command::new("haproxy")
                .arg("-f")
                .arg(&file)
                .stdout(Stdio::null())
                .spawn()
                .context("starting haproxy")?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("haproxy did not listen within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Haproxy { process, port })
    }
}

/// Kills the child when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_figures_are_read() {
        let text = "Running 5s test @ http://127.0.0.1:1/x\n  2 threads and 32 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency     1.02ms  479.38us  13.39ms   80.85%\n\
            \x20 Latency Distribution\n     50%  812.00us\n     75%    1.20ms\n     90%    1.60ms\n     99%    2.08ms\n\
            \x20 155792 requests in 5.00s, 97.21MB read\nRequests/sec:  31158.50\nTransfer/sec:     19.44MB\n";
        let load = parse_wrk(text).unwrap();
        assert_eq!(load.requests, 155_792);
        assert_eq!(load.requests_per_s, 31158.5);
        assert_eq!(load.p50, Duration::from_micros(812));
        assert_eq!(load.p99, Duration::from_micros(2080));
        let failing = format!("{text}  Non-2xx or 3xx responses: 12\n");
        assert!(parse_wrk(&failing).is_none());
    }
}
