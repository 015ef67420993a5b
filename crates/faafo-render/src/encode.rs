//! Rendering straight into an 8-bit indexed PNG, band by band, on every core.
//!
//! Rows of a band are rendered in parallel; while the encoder compresses one band, the
//! next is being rendered. Memory holds two bands, never the whole image.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::kernel::{EngineUnavailable, Kernel, column_coordinates, render_rows};
use crate::{Engine, JuliaParams};

/// The 32 colours that occur: entry `k` is `(k%8*32, k%16*16, k*8)`.
pub const PALETTE: [u8; 96] = {
    let mut palette = [0u8; 96];
    let mut k = 0;
    while k < 32 {
        palette[3 * k] = (k % 8 * 32) as u8;
        palette[3 * k + 1] = (k % 16 * 16) as u8;
        palette[3 * k + 2] = (k * 8) as u8;
        k += 1;
    }
    palette
};

/// Pixels rendered between two writes to the encoder.
const BAND_PIXELS: usize = 1 << 20;

/// Pixels of one piece of a band, the unit of work of a pool thread (whole rows, at least
/// one): enough rows that the vector lanes seldom run dry, few enough that a band still
/// spreads over the cores and a cancelled render stops promptly.
const PIECE_PIXELS: usize = 1 << 14;

/// Images with at most this much work (pixels × iterations, an upper bound) are rendered
/// on the calling thread: handing them to the pool costs more than they do (a tiny task
/// spent a tenth of its time waking pool threads and waiting for them).
const SERIAL_WORK: u64 = 1 << 18;

/// A finished PNG and its identity.
#[derive(Debug, Clone)]
pub struct RenderedPng {
    pub bytes: Vec<u8>,
    /// Lower-case hex sha256 of `bytes`.
    pub checksum: String,
    pub stats: RenderStats,
}

/// What a render cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RenderStats {
    /// `z` updates the original algorithm performs for this image, summed over pixels.
    pub iterations: u64,
    /// Time spent rendering bands (overlaps with encoding).
    pub render: Duration,
    /// Time spent in the PNG encoder.
    pub encode: Duration,
    /// From start to the last byte.
    pub wall: Duration,
}

/// Why a render produced no image.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("render cancelled")]
    Cancelled,
    #[error(transparent)]
    Engine(#[from] EngineUnavailable),
    #[error("PNG encoding failed")]
    Encode(#[source] png::EncodingError),
    /// Where the PNG goes refused it (a full disk, a closed pipe).
    #[error("writing the PNG failed")]
    Write(#[source] std::io::Error),
}

impl From<png::EncodingError> for RenderError {
    fn from(error: png::EncodingError) -> Self {
        match error {
            png::EncodingError::IoError(error) => RenderError::Write(error),
            other => RenderError::Encode(other),
        }
    }
}

/// Renders `params` into PNG bytes in memory and checksums them, using the current
/// rayon pool (all cores by default).
///
/// `cancel` is looked at before every row; once it is set the render stops with
/// [`RenderError::Cancelled`].
pub fn render_png(
    params: &JuliaParams,
    engine: Engine,
    cancel: &AtomicBool,
) -> Result<RenderedPng, RenderError> {
    let mut bytes = Vec::new();
    let stats = render_png_to(params, engine, cancel, &mut bytes)?;
    let checksum = hex::encode(Sha256::digest(&bytes));
    Ok(RenderedPng {
        bytes,
        checksum,
        stats,
    })
}

/// Renders `params` as a PNG into `out`, streaming band by band.
pub fn render_png_to<W: Write + Send>(
    params: &JuliaParams,
    engine: Engine,
    cancel: &AtomicBool,
    out: W,
) -> Result<RenderStats, RenderError> {
    let parallel =
        u64::from(params.width) * u64::from(params.height) * u64::from(params.iterations)
            > SERIAL_WORK;
    let mut sink = KeepError { out, error: None };
    match encode(params, engine, cancel, &mut sink, parallel) {
        Err(_) if sink.error.is_some() => Err(RenderError::Write(sink.error.expect("just seen"))),
        result => result,
    }
}

/// Keeps the first error of the writer it wraps: png passes a failed write on as text,
/// and callers need the error itself (a closed pipe is no failure to report).
struct KeepError<W> {
    out: W,
    error: Option<std::io::Error>,
}

impl<W> KeepError<W> {
    fn keep(&mut self, error: &std::io::Error) {
        if self.error.is_none() {
            self.error = Some(match error.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(error.kind(), error.to_string()),
            });
        }
    }
}

impl<W: Write> Write for KeepError<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.out.write(buf);
        if let Err(error) = &written {
            self.keep(error);
        }
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let flushed = self.out.flush();
        if let Err(error) = &flushed {
            self.keep(error);
        }
        flushed
    }
}

fn encode<W: Write + Send>(
    params: &JuliaParams,
    engine: Engine,
    cancel: &AtomicBool,
    out: W,
    parallel: bool,
) -> Result<RenderStats, RenderError> {
    let started = Instant::now();
    let kernel = engine.kernel()?;
    let mut encoder = png::Encoder::new(out, params.width, params.height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(&PALETTE[..]);
    encoder.set_compression(png::Compression::Fast);
    // Each row less the one above: on the typical mix 14% smaller than less the pixel
    // to the left (5% on the heavy case), and no slower to encode; choosing per row
    // (adaptive) took 60% longer for 0.2% less.
    encoder.set_filter(png::Filter::Up);
    let mut writer = encoder.write_header()?;
    let mut stream = writer.stream_writer()?;

    let width = params.width as usize;
    let rows_per_band = (BAND_PIXELS / width).clamp(1, params.height as usize) as u32;
    let columns = column_coordinates(params);
    let band = |first_row: u32, buffer: &mut Vec<u8>| -> Result<(u64, Duration), RenderError> {
        let started = Instant::now();
        let rows = rows_per_band.min(params.height - first_row) as usize;
        buffer.resize(rows * width, 0);
        let work = render_band(
            params, kernel, &columns, first_row, buffer, cancel, parallel,
        )?;
        Ok((work, started.elapsed()))
    };

    let mut stats = RenderStats::default();
    let mut current = Vec::with_capacity(rows_per_band as usize * width);
    let mut next = Vec::with_capacity(rows_per_band as usize * width);
    let (work, took) = band(0, &mut current)?;
    stats.iterations += work;
    stats.render += took;
    let mut row = 0;
    while row < params.height {
        let following = row + rows_per_band;
        // Encode this band on this thread while the pool renders the next one.
        let (encoded, rendered) = join(
            parallel,
            || {
                let started = Instant::now();
                stream.write_all(&current).map(|()| started.elapsed())
            },
            || {
                if following < params.height {
                    band(following, &mut next).map(Some)
                } else {
                    Ok(None)
                }
            },
        );
        stats.encode += encoded.map_err(png::EncodingError::from)?;
        if let Some((work, took)) = rendered? {
            stats.iterations += work;
            stats.render += took;
        }
        std::mem::swap(&mut current, &mut next);
        row = following;
    }
    let finishing = Instant::now();
    stream.finish()?;
    writer.finish()?;
    stats.encode += finishing.elapsed();
    stats.wall = started.elapsed();
    Ok(stats)
}

/// Runs both closures, on the pool side by side when `parallel`, else one after the other
/// on this thread.
fn join<A: Send, B: Send>(
    parallel: bool,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    if parallel {
        rayon::join(a, b)
    } else {
        (a(), b())
    }
}

/// Renders the rows of one band, in parallel when `parallel`.
fn render_band(
    params: &JuliaParams,
    kernel: Kernel,
    columns: &[f64],
    first_row: u32,
    band: &mut [u8],
    cancel: &AtomicBool,
    parallel: bool,
) -> Result<u64, RenderError> {
    let rows_per_piece = (PIECE_PIXELS / columns.len()).max(1);
    let piece = |(index, pixels): (usize, &mut [u8])| {
        // Piece by piece, so a small image with many iterations still stops promptly.
        if cancel.load(Ordering::Relaxed) {
            return 0;
        }
        let row = first_row + (index * rows_per_piece) as u32;
        render_rows(params, kernel, columns, row, pixels)
    };
    let size = rows_per_piece * columns.len();
    let work = if parallel {
        band.par_chunks_mut(size).enumerate().map(piece).sum()
    } else {
        band.chunks_mut(size).enumerate().map(piece).sum()
    };
    if cancel.load(Ordering::Relaxed) {
        return Err(RenderError::Cancelled);
    }
    Ok(work)
}

/// An indexed image as a PNG holds it, one palette index per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedImage {
    pub width: u32,
    pub height: u32,
    /// Red, green and blue of each entry.
    pub palette: Vec<u8>,
    /// Row after row.
    pub indices: Vec<u8>,
}

/// Why bytes are not an image as this renderer makes them.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a readable PNG")]
    Png(#[from] png::DecodingError),
    #[error("not an 8-bit PNG with a palette but {color:?} of depth {depth:?}")]
    NotIndexed {
        color: png::ColorType,
        depth: png::BitDepth,
    },
}

/// Decodes an 8-bit indexed PNG to its palette indices; any other kind of PNG is an
/// error. Unlike its bytes, which the encoder's settings shape, this is what a render
/// must reproduce.
pub fn decode_indexed(bytes: &[u8]) -> Result<IndexedImage, DecodeError> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
    let info = reader.info();
    let (width, height) = (info.width, info.height);
    let palette = match (info.color_type, info.bit_depth, &info.palette) {
        (png::ColorType::Indexed, png::BitDepth::Eight, Some(palette)) => palette.to_vec(),
        (color, depth, _) => return Err(DecodeError::NotIndexed { color, depth }),
    };
    let mut indices = vec![0; reader.output_buffer_size().unwrap_or(0)];
    reader.next_frame(&mut indices)?;
    Ok(IndexedImage {
        width,
        height,
        palette,
        indices,
    })
}

/// The width and height a PNG declares, read from its header only.
pub fn png_dimensions(bytes: &[u8]) -> Result<(u32, u32), png::DecodingError> {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
    let info = reader.info();
    Ok((info.width, info.height))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> JuliaParams {
        JuliaParams {
            width: 37,
            height: 23,
            iterations: 64,
            xa: -2.0,
            xb: 2.0,
            ya: -1.5,
            yb: 1.5,
            cx: -0.8,
            cy: 0.156,
        }
    }

    #[test]
    fn palette_matches_the_colour_rule() {
        for step in 0u32..200 {
            let k = step as usize % 32;
            let rgb = [PALETTE[3 * k], PALETTE[3 * k + 1], PALETTE[3 * k + 2]];
            assert_eq!(
                rgb,
                [
                    (step % 8 * 32) as u8,
                    (step % 16 * 16) as u8,
                    (step % 32 * 8) as u8
                ]
            );
        }
    }

    #[test]
    fn same_params_same_bytes_on_every_engine() {
        let never = AtomicBool::new(false);
        let a = render_png(&params(), Engine::Scalar, &never).unwrap();
        let b = render_png(&params(), Engine::Auto, &never).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.stats.iterations, b.stats.iterations);
        assert_eq!(a.checksum, hex::encode(Sha256::digest(&a.bytes)));
        assert_eq!(&a.bytes[1..4], b"PNG");
    }

    #[test]
    fn bands_do_not_change_the_bytes() {
        // Wide enough that the image spans several bands.
        let wide = JuliaParams {
            width: 4096,
            height: 300,
            ..params()
        };
        let never = AtomicBool::new(false);
        let banded = render_png(&wide, Engine::Auto, &never).unwrap();
        let mut indices = vec![0u8; 4096 * 300];
        crate::render_rows(
            &wide,
            Kernel::Scalar,
            &column_coordinates(&wide),
            0,
            &mut indices,
        );
        let decoded = decode_indexed(&banded.bytes).unwrap();
        assert_eq!((decoded.width, decoded.height), (4096, 300));
        assert_eq!(decoded.palette, PALETTE);
        assert_eq!(decoded.indices, indices);
    }

    #[test]
    fn serial_and_parallel_renders_are_the_same_bytes() {
        let never = AtomicBool::new(false);
        let render = |parallel| {
            let mut bytes = Vec::new();
            encode(&params(), Engine::Auto, &never, &mut bytes, parallel).unwrap();
            bytes
        };
        assert_eq!(render(false), render(true));
    }

    #[test]
    fn a_failed_write_is_reported_as_itself() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let wide = JuliaParams {
            width: 2048,
            height: 1100,
            ..params()
        };
        for params in [params(), wide] {
            let never = AtomicBool::new(false);
            match render_png_to(&params, Engine::Auto, &never, Closed) {
                Err(RenderError::Write(error)) => {
                    assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn cancelled_render_stops() {
        let cancelled = AtomicBool::new(true);
        let result = render_png(&params(), Engine::Scalar, &cancelled);
        assert!(matches!(result, Err(RenderError::Cancelled)));
    }
}
