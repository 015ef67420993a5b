//! The client commands: `create`, `list`, `show`, `get`, `delete`. They accept the
//! original faafo CLI's command lines and print its tables, or JSON with `--json`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Args;
use faafo_client::{Client, RetryPolicy};
use faafo_core::FractalState;
use faafo_core::wire::{CreateFractal, FractalView};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::tables;

/// How the client commands talk and print.
#[derive(Debug, Clone)]
pub struct Output {
    pub json: bool,
}

/// The client of the CLI commands: `ca`, the PEM of `--ca-cert`, is trusted besides the
/// system's roots.
pub fn client(
    endpoints: &str,
    timeout: Duration,
    ca: Option<&[u8]>,
    api_key: Option<&str>,
) -> anyhow::Result<Client> {
    let policy = RetryPolicy {
        total: timeout,
        ..RetryPolicy::default()
    };
    let mut client = Client::new(endpoints, policy).context("--endpoint-url")?;
    if let Some(pem) = ca {
        client = client.with_root_certificates(pem).context("--ca-cert")?;
    }
    if let Some(key) = api_key {
        client = client.with_api_key(key.to_owned());
    }
    Ok(client.with_discovery())
}

/// `faafo create`: the original's flags and defaults. A fixed value (`--width`) overrides
/// the random range (`--min-width`..`--max-width`).
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Width in pixels (instead of a random one in --min-width..--max-width).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub width: Option<u32>,
    /// Height in pixels (instead of a random one in --min-height..--max-height).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub height: Option<u32>,
    /// Iterations (instead of a random number in --min-iterations..--max-iterations).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub iterations: Option<u32>,
    /// How many fractals to create.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub tasks: Option<u32>,
    /// Left edge of the window in the complex plane (instead of a random one).
    #[arg(long, allow_negative_numbers = true)]
    pub xa: Option<f64>,
    /// Right edge of the window.
    #[arg(long, allow_negative_numbers = true)]
    pub xb: Option<f64>,
    /// Bottom edge of the window.
    #[arg(long, allow_negative_numbers = true)]
    pub ya: Option<f64>,
    /// Top edge of the window.
    #[arg(long, allow_negative_numbers = true)]
    pub yb: Option<f64>,
    /// The real part of the Julia constant c (with --cy). Without them the server picks
    /// c by the original's rule.
    #[arg(long, allow_negative_numbers = true, requires = "cy")]
    pub cx: Option<f64>,
    /// The imaginary part of c (with --cx).
    #[arg(long, allow_negative_numbers = true, requires = "cx")]
    pub cy: Option<f64>,
    /// Smallest random width.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_width: u32,
    /// Largest random width.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_width: u32,
    /// Smallest random height.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_height: u32,
    /// Largest random height.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_height: u32,
    /// Fewest random iterations.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_iterations: u32,
    /// Most random iterations.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_iterations: u32,
    /// Fewest fractals when --tasks is not given (a random count).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_tasks: u32,
    /// Most fractals when --tasks is not given.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tasks: u32,
    /// Smallest random left edge.
    #[arg(long, default_value_t = -4.0, allow_negative_numbers = true)]
    pub min_xa: f64,
    /// Largest random left edge.
    #[arg(long, default_value_t = -1.0, allow_negative_numbers = true)]
    pub max_xa: f64,
    /// Smallest random right edge.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub min_xb: f64,
    /// Largest random right edge.
    #[arg(long, default_value_t = 4.0, allow_negative_numbers = true)]
    pub max_xb: f64,
    /// Smallest random bottom edge.
    #[arg(long, default_value_t = -3.0, allow_negative_numbers = true)]
    pub min_ya: f64,
    /// Largest random bottom edge.
    #[arg(long, default_value_t = -0.5, allow_negative_numbers = true)]
    pub max_ya: f64,
    /// Smallest random top edge.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub min_yb: f64,
    /// Largest random top edge.
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    pub max_yb: f64,
    /// Show progress until every fractal is done or failed, then print them.
    #[arg(long)]
    pub wait: bool,
}

/// A value fixed by a flag, or drawn from a range.
fn pick<T: PartialOrd + Copy + std::fmt::Display + rand::distr::uniform::SampleUniform>(
    name: &str,
    fixed: Option<T>,
    min: T,
    max: T,
) -> anyhow::Result<T> {
    if let Some(value) = fixed {
        return Ok(value);
    }
    ensure!(
        min <= max,
        "--min-{name} ({min}) is greater than --max-{name} ({max})"
    );
    Ok(rand::random_range(min..=max))
}

impl CreateArgs {
    /// The requests to send, with client-chosen uuids so retries never duplicate. Every
    /// flag is checked here, before any request.
    pub fn requests(&self) -> anyhow::Result<Vec<CreateFractal>> {
        let floats = [
            ("xa", self.xa, self.min_xa, self.max_xa),
            ("xb", self.xb, self.min_xb, self.max_xb),
            ("ya", self.ya, self.min_ya, self.max_ya),
            ("yb", self.yb, self.min_yb, self.max_yb),
        ];
        for (name, fixed, min, max) in floats {
            for (flag, value) in [
                (name.to_owned(), fixed),
                (format!("min-{name}"), Some(min)),
                (format!("max-{name}"), Some(max)),
            ] {
                if let Some(value) = value {
                    ensure!(
                        value.is_finite(),
                        "--{flag} must be a finite number, got {value}"
                    );
                }
            }
        }
        for (flag, value) in [("cx", self.cx), ("cy", self.cy)] {
            if let Some(value) = value {
                ensure!(
                    value.is_finite(),
                    "--{flag} must be a finite number, got {value}"
                );
            }
        }
        let tasks = pick("tasks", self.tasks, self.min_tasks, self.max_tasks)?;
        (0..tasks)
            .map(|_| {
                let request = CreateFractal {
                    uuid: Some(Uuid::new_v4()),
                    width: pick("width", self.width, self.min_width, self.max_width)?,
                    height: pick("height", self.height, self.min_height, self.max_height)?,
                    iterations: pick(
                        "iterations",
                        self.iterations,
                        self.min_iterations,
                        self.max_iterations,
                    )?,
                    xa: pick("xa", self.xa, self.min_xa, self.max_xa)?,
                    xb: pick("xb", self.xb, self.min_xb, self.max_xb)?,
                    ya: pick("ya", self.ya, self.min_ya, self.max_ya)?,
                    yb: pick("yb", self.yb, self.min_yb, self.max_yb)?,
                    cx: self.cx,
                    cy: self.cy,
                };
                ensure!(
                    request.xa != request.xb,
                    "xa and xb are both {}: the image would have no width",
                    request.xa
                );
                ensure!(
                    request.ya != request.yb,
                    "ya and yb are both {}: the image would have no height",
                    request.ya
                );
                Ok(request)
            })
            .collect()
    }
}

pub async fn create(client: &Client, args: &CreateArgs, output: &Output) -> anyhow::Result<()> {
    let requests = args.requests()?;
    let mut created = Vec::with_capacity(requests.len());
    for request in &requests {
        created.push(client.create(request).await.context("creating a fractal")?);
    }
    if !args.wait {
        return print_fractals(&created, output);
    }
    let finished = wait_until_finished(client, created).await?;
    print_fractals(&finished, output)?;
    let failed = finished
        .iter()
        .filter(|f| f.state == FractalState::Failed)
        .count();
    if failed > 0 {
        bail!(
            "{failed} of {} fractals failed (see the error column of `faafo show UUID`)",
            finished.len()
        );
    }
    Ok(())
}

/// Polls every pending fractal until all are done or failed, drawing a progress bar on a
/// terminal.
async fn wait_until_finished(
    client: &Client,
    mut fractals: Vec<FractalView>,
) -> anyhow::Result<Vec<FractalView>> {
    let bar = indicatif::ProgressBar::new(fractals.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} done, {per_sec} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    loop {
        for fractal in fractals.iter_mut().filter(|f| !f.state.is_finished()) {
            *fractal = client
                .get(fractal.uuid)
                .await
                .with_context(|| format!("checking fractal {}", fractal.uuid))?;
        }
        let finished = fractals.iter().filter(|f| f.state.is_finished()).count();
        bar.set_position(finished as u64);
        if finished == fractals.len() {
            bar.finish_and_clear();
            return Ok(fractals);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn list(client: &Client, output: &Output) -> anyhow::Result<()> {
    if !output.json {
        // The table needs every row for its column widths.
        let all = client.list_all().await.context("listing fractals")?;
        return print_fractals(&all, output);
    }
    // JSON goes out a page at a time, in the layout print_json gives a whole array, so
    // that a long list is never held in memory.
    let mut walk = client.list_walk();
    let mut listed = 0;
    while let Some(page) = walk.next_page().await.context("listing fractals")? {
        let mut stdout = std::io::stdout().lock();
        for fractal in &page {
            stdout.write_all(if listed == 0 { b"[\n" } else { b",\n" })?;
            for (index, line) in serde_json::to_string_pretty(fractal)?.lines().enumerate() {
                if index > 0 {
                    stdout.write_all(b"\n")?;
                }
                write!(stdout, "  {line}")?;
            }
            listed += 1;
        }
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(if listed == 0 { b"[]\n" } else { b"\n]\n" })?;
    Ok(())
}

pub async fn show(client: &Client, uuid: Uuid, output: &Output) -> anyhow::Result<()> {
    let fractal = client.get(uuid).await?;
    if output.json {
        return print_json(&fractal);
    }
    print!("{}", tables::fractal_details(&fractal));
    Ok(())
}

/// `faafo status`: every node of the deployment and the queue.
pub async fn status(client: &Client, output: &Output) -> anyhow::Result<()> {
    let status = client.cluster_status().await?;
    if output.json {
        return print_json(&status);
    }
    print!("{}", tables::cluster_status(&status));
    Ok(())
}

pub async fn delete(client: &Client, uuid: Uuid, output: &Output) -> anyhow::Result<()> {
    client.delete(uuid).await?;
    if output.json {
        return print_json(&serde_json::json!({ "deleted": uuid }));
    }
    println!("deleted {uuid}");
    Ok(())
}

/// `faafo get`: downloads the PNG and checks it against the record's checksum before
/// writing it (to `FILE`, `UUID.png` by default, or stdout for `-`).
pub async fn get(
    client: &Client,
    uuid: Uuid,
    file: Option<PathBuf>,
    output: &Output,
) -> anyhow::Result<()> {
    let fractal = client.get(uuid).await?;
    let Some(expected) = fractal
        .checksum
        .clone()
        .filter(|_| fractal.state == FractalState::Done)
    else {
        bail!(
            "fractal {uuid} is {}: it has no image{}",
            fractal.state,
            match fractal.state {
                FractalState::Failed => format!(" ({})", fractal.error.unwrap_or_default()),
                _ => " yet; try again when it is done".to_owned(),
            }
        );
    };
    let png = client.image(uuid).await?;
    let actual = hex::encode(Sha256::digest(&png));
    ensure!(
        actual == expected,
        "the downloaded image of {uuid} is damaged: sha256 {actual}, the record says {expected}"
    );
    let target = file.unwrap_or_else(|| PathBuf::from(format!("{uuid}.png")));
    if target.as_os_str() == "-" {
        std::io::stdout()
            .lock()
            .write_all(&png)
            .context("writing the image to stdout")?;
        return Ok(());
    }
    // Write beside the target and rename, so a half-written file never has its name.
    let directory = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut temporary = tempfile::NamedTempFile::new_in(directory)
        .with_context(|| format!("cannot write in {}", directory.display()))?;
    temporary.write_all(&png).context("writing the image")?;
    temporary
        .persist(&target)
        .with_context(|| format!("saving {}", target.display()))?;
    if output.json {
        return print_json(
            &serde_json::json!({ "uuid": uuid, "file": target, "size": png.len(), "checksum": actual }),
        );
    }
    println!(
        "saved {} ({} bytes, sha256 {actual} verified)",
        target.display(),
        png.len()
    );
    Ok(())
}

fn print_fractals(fractals: &[FractalView], output: &Output) -> anyhow::Result<()> {
    if output.json {
        return print_json(&fractals);
    }
    print!("{}", tables::fractal_list(fractals));
    Ok(())
}

pub fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        create: CreateArgs,
    }

    fn parse(args: &[&str]) -> CreateArgs {
        Wrapper::try_parse_from(std::iter::once("create").chain(args.iter().copied()))
            .unwrap()
            .create
    }

    #[test]
    fn the_seed_command_line_fixes_size_and_count() {
        let requests = parse(&["--height", "9999", "--width", "9999", "--tasks", "5"])
            .requests()
            .unwrap();
        assert_eq!(requests.len(), 5);
        for request in &requests {
            assert_eq!((request.width, request.height), (9999, 9999));
            assert!((128..=512).contains(&request.iterations));
            assert!((-4.0..=-1.0).contains(&request.xa) && (1.0..=4.0).contains(&request.xb));
            assert!((-3.0..=-0.5).contains(&request.ya) && (0.5..=3.0).contains(&request.yb));
        }
        let uuids: std::collections::HashSet<_> = requests.iter().map(|r| r.uuid).collect();
        assert_eq!(uuids.len(), 5, "every request has its own uuid");
    }

    #[test]
    fn defaults_follow_the_original_ranges() {
        for _ in 0..50 {
            let requests = parse(&[]).requests().unwrap();
            assert!((1..=10).contains(&requests.len()));
            for r in requests {
                assert!((256..=1024).contains(&r.width) && (256..=1024).contains(&r.height));
            }
        }
    }

    #[test]
    fn negative_values_parse_and_ranges_are_checked() {
        let requests = parse(&["--xa", "-2.5", "--xb", "2.5", "--tasks", "1"])
            .requests()
            .unwrap();
        assert_eq!((requests[0].xa, requests[0].xb), (-2.5, 2.5));
        let error = parse(&["--min-width", "900", "--max-width", "100"])
            .requests()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "--min-width (900) is greater than --max-width (100)"
        );
        let error = parse(&["--xa", "1", "--xb", "1"]).requests().unwrap_err();
        assert!(error.to_string().contains("no width"), "{error}");
        let error = parse(&["--ya", "NaN"]).requests().unwrap_err();
        assert!(
            error.to_string().contains("--ya must be a finite number"),
            "{error}"
        );
        assert!(Wrapper::try_parse_from(["create", "--width", "0"]).is_err());
        assert!(Wrapper::try_parse_from(["create", "--tasks", "-1"]).is_err());
    }
}
