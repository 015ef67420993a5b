//! `faafo bench render`: renderer figures, scalar and SIMD side by side in one run.

use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use faafo_render::{Engine, JuliaParams, choose_constant, render_png};

use crate::bench::OriginalWindows;
use crate::bench_report::{Report, median};
use crate::render_cli::in_pool;

/// The bound the issue states for one core of the reference machine (Zen 3, ~3 GHz,
/// f64 AVX2 without FMA): lane-iterations per second.
const REFERENCE_BOUND: f64 = 4.4e9;

#[derive(Debug)]
pub struct Options {
    pub tasks: u32,
    pub seed: u64,
    pub large: bool,
    /// Each round measures the ceiling and then every case on every engine once; the
    /// figures are the rounds' medians, each share against its own round's ceiling.
    pub rounds: u32,
}

/// Renders (and encodes) a set of images on one thread.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    pixels: u64,
    iterations: u64,
    wall: Duration,
    encode: Duration,
    bytes: u64,
    /// The ceiling measured in the same round, if this CPU has AVX2.
    ceiling: Option<f64>,
}

impl Figures {
    fn megapixels_per_second(&self) -> f64 {
        self.pixels as f64 / self.wall.as_secs_f64() / 1e6
    }
    fn iterations_per_second(&self) -> f64 {
        self.iterations as f64 / self.wall.as_secs_f64()
    }
    fn share_of_ceiling(&self) -> Option<f64> {
        Some(self.iterations_per_second() / self.ceiling?)
    }
    fn encode_ms_per_mpixel(&self) -> f64 {
        self.encode.as_secs_f64() * 1e3 / (self.pixels as f64 / 1e6)
    }
}

fn measure(images: &[JuliaParams], engine: Engine, threads: u32) -> anyhow::Result<Figures> {
    let never = AtomicBool::new(false);
    in_pool(Some(threads), || {
        let mut figures = Figures::default();
        let started = Instant::now();
        for params in images {
            let png = render_png(params, engine, &never)?;
            figures.pixels += u64::from(params.width) * u64::from(params.height);
            figures.iterations += png.stats.iterations;
            figures.encode += png.stats.encode;
            figures.bytes += png.bytes.len() as u64;
        }
        figures.wall = started.elapsed();
        Ok(figures)
    })
}

/// Tasks as faafo makes them: the original client's random windows and sizes, `c` by the
/// original's rule.
fn typical_mix(tasks: u32, seed: u64) -> Vec<JuliaParams> {
    let mut random = OriginalWindows::new(seed);
    (0..tasks)
        .map(|task| {
            let (xa, xb, ya, yb) = random.next();
            let width = random.uniform(256.0, 1025.0) as u32;
            let height = random.uniform(256.0, 1025.0) as u32;
            let iterations = random.uniform(128.0, 513.0) as u32;
            let c = choose_constant(xa, xb, ya, yb, iterations, seed ^ u64::from(task));
            JuliaParams {
                width,
                height,
                iterations,
                xa,
                xb,
                ya,
                yb,
                cx: c.cx,
                cy: c.cy,
            }
        })
        .collect()
}

pub fn run(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let simd = Engine::Simd
        .kernel()
        .map(|_| Engine::Simd)
        .unwrap_or(Engine::Scalar);
    if simd == Engine::Scalar {
        report.say("note: this CPU has no AVX2; the SIMD rows below are the scalar kernel");
    }
    report.say(
        "faafo bench render (one core unless stated; lane-iterations are the original algorithm's z updates)",
    );
    report.figure("reference_bound_lane_iterations_per_s", REFERENCE_BOUND);
    report.figure("rounds", options.rounds);

    let mix = typical_mix(options.tasks, options.seed);
    let heavy = [JuliaParams {
        width: 1024,
        height: 1024,
        iterations: 512,
        xa: -1.6,
        xb: 1.6,
        ya: -1.2,
        yb: 1.2,
        cx: -0.8,
        cy: 0.156,
    }];
    let cases = [
        (
            "typical",
            format!(
                "typical mix ({} tasks, 256..1024 px, 128..512 iterations)",
                mix.len()
            ),
            &mix[..],
        ),
        (
            "heavy",
            "heavy (c = -0.8+0.156i, 1024x1024, 512 iterations)".to_owned(),
            &heavy[..],
        ),
    ];
    // Shared machines change speed from one minute to the next: each round measures
    // the ceiling beside the cases, and each share is against its own round's ceiling.
    let mut ceilings = Vec::new();
    let mut rounds: Vec<[Vec<Figures>; 2]> = vec![Default::default(); cases.len()];
    for _ in 0..options.rounds {
        let ceiling = arithmetic_ceiling();
        ceilings.extend(ceiling);
        for ((_, _, images), measured) in cases.iter().zip(&mut rounds) {
            for (engine, figures) in [Engine::Scalar, simd].into_iter().zip(measured.iter_mut()) {
                let mut round = measure(images, engine, 1)?;
                round.ceiling = ceiling;
                figures.push(round);
            }
        }
    }
    if ceilings.is_empty() {
        report.say("this core's ceiling: not measured (no AVX2)");
    } else {
        let ceiling = median(&ceilings);
        report.say(format!(
            "this core's ceiling: a bare AVX2 loop of the same arithmetic runs {:.2} G lane-iterations/s ({:.0}% of the reference bound of {:.1} G/s; median of {} rounds)",
            ceiling / 1e9,
            ceiling / REFERENCE_BOUND * 100.0,
            REFERENCE_BOUND / 1e9,
            options.rounds
        ));
        report.figure("ceiling_lane_iterations_per_s", ceiling);
    }
    for ((key, name, _), [scalar, vector]) in cases.iter().zip(&rounds) {
        report.say(format!("\n{name}"));
        for (label, each) in [("scalar", scalar), ("simd", vector)] {
            let figure = |pick: fn(&Figures) -> Option<f64>| {
                median(&each.iter().filter_map(pick).collect::<Vec<_>>())
            };
            let mpixel = figure(|round| Some(round.megapixels_per_second()));
            let lane_iterations = figure(|round| Some(round.iterations_per_second()));
            let share = figure(Figures::share_of_ceiling);
            let encode = figure(|round| Some(round.encode_ms_per_mpixel()));
            let shares: Vec<String> = each
                .iter()
                .filter_map(Figures::share_of_ceiling)
                .map(|share| format!("{:.1}%", share * 100.0))
                .collect();
            let against_ceiling = if shares.is_empty() {
                String::new()
            } else {
                format!(
                    ", {:>5.1}% of ceiling (rounds {})",
                    share * 100.0,
                    shares.join(" ")
                )
            };
            report.say(format!(
                "  {label:<6}  {mpixel:>7.1} Mpixel/s  {:>5.2} G lane-it/s ({:>5.1}% of bound{against_ceiling})  encode {encode:.2} ms/Mpixel  {:.1} iterations/pixel",
                lane_iterations / 1e9,
                lane_iterations / REFERENCE_BOUND * 100.0,
                each[0].iterations as f64 / each[0].pixels as f64,
            ));
            let at = |figure: &str| format!("{key}.{label}.{figure}");
            report.figure(&at("mpixel_per_s"), mpixel);
            report.figure(&at("lane_iterations_per_s"), lane_iterations);
            if !shares.is_empty() {
                report.figure(&at("share_of_ceiling"), share);
            }
            report.figure(&at("encode_ms_per_mpixel"), encode);
        }
        let speedup = median(
            &scalar
                .iter()
                .zip(vector)
                .map(|(scalar, vector)| scalar.wall.as_secs_f64() / vector.wall.as_secs_f64())
                .collect::<Vec<_>>(),
        );
        report.say(format!(
            "  speed-up of simd over scalar: {speedup:.2}x; PNG bytes {}",
            vector[0].bytes
        ));
        report.figure(&format!("{key}.simd_speedup"), speedup);
    }

    if options.large {
        report.say(
            "\n9999x9999, 256 iterations, every core, streamed to a file (a separate process, for its peak memory)",
        );
        for engine in ["scalar", "simd"] {
            let (wall, rss) = large_render(engine)?;
            report.say(format!("  {engine:<6}  {wall:.3} s  peak RSS {rss:.1} MiB"));
            report.figure(&format!("large.{engine}.seconds"), wall);
            report.figure(&format!("large.{engine}.peak_rss_mib"), rss);
        }
    }
    Ok(())
}

/// Runs `faafo render` for the 9999x9999 case in a child process and reads its figures.
fn large_render(engine: &str) -> anyhow::Result<(f64, f64)> {
    let output = tempfile::NamedTempFile::new()?;
    let result = Command::new(std::env::current_exe()?)
        .args([
            "render",
            "--width",
            "9999",
            "--height",
            "9999",
            "--iterations",
            "256",
            "--stats",
            "--engine",
            engine,
        ])
        .arg("-o")
        .arg(output.path())
        .output()
        .context("running faafo render")?;
    if !result.status.success() {
        bail!(
            "faafo render failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let text = String::from_utf8_lossy(&result.stderr);
    let number_after = |label: &str| -> Option<f64> {
        let line = text
            .lines()
            .find(|line| line.trim_start().starts_with(label))?;
        line.trim_start()[label.len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    match (number_after("wall"), number_after("peak memory")) {
        (Some(wall), Some(rss)) => Ok((wall, rss)),
        _ => bail!("unexpected faafo render output:\n{text}"),
    }
}

/// What one core does on the bare arithmetic of an iteration (4 interleaved AVX2 chains,
/// no bookkeeping): the practical ceiling of this machine, measured in the same run.
fn arithmetic_ceiling() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return Some(unsafe { ceiling::lane_iterations_per_second() });
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod ceiling {
    use std::arch::x86_64::*;
    use std::time::Instant;

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn lane_iterations_per_second() -> f64 {
        const ROUNDS: u64 = 50_000_000;
        let c = _mm256_set1_pd(-0.1);
        let four = _mm256_set1_pd(4.0);
        let (mut a_re, mut b_re, mut c_re, mut d_re) = (
            _mm256_set1_pd(0.1),
            _mm256_set1_pd(0.2),
            _mm256_set1_pd(0.3),
            _mm256_set1_pd(0.05),
        );
        let (mut a_im, mut b_im, mut c_im, mut d_im) = (c, c, c, c);
        let mut escaped = 0;
        let started = Instant::now();
        for _ in 0..ROUNDS {
            macro_rules! step {
                ($re:ident, $im:ident) => {{
                    let rr = _mm256_mul_pd($re, $re);
                    let ii = _mm256_mul_pd($im, $im);
                    escaped |= _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(
                        _mm256_add_pd(rr, ii),
                        four,
                    ));
                    let ri = _mm256_mul_pd($re, $im);
                    $re = _mm256_add_pd(_mm256_sub_pd(rr, ii), c);
                    $im = _mm256_add_pd(_mm256_add_pd(ri, ri), c);
                }};
            }
            step!(a_re, a_im);
            step!(b_re, b_im);
            step!(c_re, c_im);
            step!(d_re, d_im);
            if escaped == 15 {
                break;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        std::hint::black_box((a_re, b_re, c_re, d_re, a_im, b_im, c_im, d_im));
        (ROUNDS * 16) as f64 / seconds
    }
}
