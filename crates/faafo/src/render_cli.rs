//! `faafo render`: renders one fractal locally, without a server.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Args, ValueEnum};
use faafo_core::wire::CreateFractal;
use faafo_core::{FractalSpec, Limits};
use faafo_render::{Engine, JuliaParams};

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Width in pixels.
    #[arg(long, default_value_t = 1024)]
    pub width: u32,
    /// Height in pixels.
    #[arg(long, default_value_t = 768)]
    pub height: u32,
    /// Iterations per pixel at most.
    #[arg(long, default_value_t = 256)]
    pub iterations: u32,
    /// Left edge of the window in the complex plane.
    #[arg(long, default_value_t = -2.0, allow_negative_numbers = true)]
    pub xa: f64,
    /// Right edge of the window.
    #[arg(long, default_value_t = 2.0, allow_negative_numbers = true)]
    pub xb: f64,
    /// Bottom edge of the window.
    #[arg(long, default_value_t = -1.5, allow_negative_numbers = true)]
    pub ya: f64,
    /// Top edge of the window.
    #[arg(long, default_value_t = 1.5, allow_negative_numbers = true)]
    pub yb: f64,
    /// Real part of c (with --cy); by default c is chosen by the original's rule.
    #[arg(long, allow_negative_numbers = true, requires = "cy")]
    pub cx: Option<f64>,
    /// Imaginary part of c (with --cx).
    #[arg(long, allow_negative_numbers = true, requires = "cx")]
    pub cy: Option<f64>,
    /// Seed of the choice of c when --cx/--cy are not given.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the PNG (- for stdout).
    #[arg(short, long, default_value = "fractal.png")]
    pub output: PathBuf,
    /// The kernel: auto (the fastest this CPU has), scalar (the reference) or simd.
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    /// Threads to render with (default: every core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// Print speed, iterations, encode time and peak memory on stderr.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineChoice {
    /// The fastest kernel this CPU supports.
    Auto,
    /// The plain scalar loop.
    Scalar,
    /// x86-64 AVX2.
    Simd,
}

impl From<EngineChoice> for Engine {
    fn from(choice: EngineChoice) -> Engine {
        match choice {
            EngineChoice::Auto => Engine::Auto,
            EngineChoice::Scalar => Engine::Scalar,
            EngineChoice::Simd => Engine::Simd,
        }
    }
}

impl RenderArgs {
    /// The render, validated as the API would validate it.
    pub fn params(&self) -> anyhow::Result<JuliaParams> {
        let request = CreateFractal {
            uuid: None,
            width: self.width,
            height: self.height,
            iterations: self.iterations,
            xa: self.xa,
            xb: self.xb,
            ya: self.ya,
            yb: self.yb,
            cx: self.cx,
            cy: self.cy,
        };
        let spec = FractalSpec::parse(&request, &Limits::default(), self.seed)
            .map_err(|e| anyhow::anyhow!("--{e}"))?;
        Ok(spec.render_params())
    }
}

pub fn render(args: &RenderArgs) -> anyhow::Result<()> {
    let params = args.params()?;
    let engine = Engine::from(args.engine);
    engine.kernel()?;
    let never = AtomicBool::new(false);
    let sink: Box<dyn Write + Send> = if args.output.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        let file = std::fs::File::create(&args.output)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        Box::new(file)
    };
    let mut out = std::io::BufWriter::new(sink);
    let stats = in_pool(args.threads, || {
        faafo_render::render_png_to(&params, engine, &never, &mut out)
    })?;
    out.flush()
        .with_context(|| format!("writing {}", args.output.display()))?;
    if args.stats {
        let megapixels = f64::from(params.width) * f64::from(params.height) / 1e6;
        let seconds = stats.wall.as_secs_f64();
        eprintln!(
            "rendered {}x{}, {} iterations, c = {:?}{:+?}i",
            params.width, params.height, params.iterations, params.cx, params.cy
        );
        eprintln!(
            "  engine          {:?}, {} thread(s)",
            engine.kernel()?,
            rayon_threads(args.threads)
        );
        eprintln!(
            "  wall            {:.3} s  ({:.1} Mpixel/s)",
            seconds,
            megapixels / seconds
        );
        eprintln!(
            "  iterations      {} ({:.2} G/s, {:.1} per pixel)",
            stats.iterations,
            stats.iterations as f64 / seconds / 1e9,
            stats.iterations as f64 / (megapixels * 1e6)
        );
        eprintln!(
            "  render time     {:.3} s (summed over bands)",
            stats.render.as_secs_f64()
        );
        eprintln!(
            "  encode time     {:.3} s  ({:.2} ms per Mpixel)",
            stats.encode.as_secs_f64(),
            stats.encode.as_secs_f64() * 1e3 / megapixels
        );
        eprintln!(
            "  peak memory     {:.1} MiB (max RSS of this process)",
            peak_rss_mib()
        );
    }
    Ok(())
}

/// Runs `work` on a pool of `threads` threads, or on the global pool (every core).
pub fn in_pool<T: Send>(threads: Option<u32>, work: impl FnOnce() -> T + Send) -> T {
    match threads {
        None => work(),
        Some(threads) => rayon::ThreadPoolBuilder::new()
            .num_threads(threads as usize)
            .build()
            .expect("a thread pool can be built")
            .install(work),
    }
}

fn rayon_threads(threads: Option<u32>) -> usize {
    threads.map_or_else(rayon::current_num_threads, |t| t as usize)
}

/// The peak resident memory of this process so far.
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    usage.ru_maxrss as f64 / 1024.0
}
