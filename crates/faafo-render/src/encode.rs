//! Rendering straight into an 8-bit indexed PNG, band by band.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

use crate::{Engine, JuliaParams, render_rows};

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

/// Pixels rendered between two writes to the encoder: memory holds a band, not the image.
const BAND_BYTES: usize = 1 << 20;

/// A finished PNG and its identity.
#[derive(Debug, Clone)]
pub struct RenderedPng {
    pub bytes: Vec<u8>,
    /// Lower-case hex sha256 of `bytes`.
    pub checksum: String,
}

/// Why a render produced no image.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("render cancelled")]
    Cancelled,
    #[error("PNG encoding failed")]
    Encode(#[from] png::EncodingError),
}

/// Renders `params` into PNG bytes in memory and checksums them.
///
/// `cancel` is looked at between bands; once it is set the render stops with
/// [`RenderError::Cancelled`].
pub fn render_png(
    params: &JuliaParams,
    engine: Engine,
    cancel: &AtomicBool,
) -> Result<RenderedPng, RenderError> {
    let mut bytes = Vec::new();
    render_png_to(params, engine, cancel, &mut bytes)?;
    let checksum = hex::encode(Sha256::digest(&bytes));
    Ok(RenderedPng { bytes, checksum })
}

/// Renders `params` as a PNG into `out`, streaming band by band.
pub fn render_png_to<W: Write>(
    params: &JuliaParams,
    engine: Engine,
    cancel: &AtomicBool,
    out: W,
) -> Result<(), RenderError> {
    let mut encoder = png::Encoder::new(out, params.width, params.height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(&PALETTE[..]);
    encoder.set_compression(png::Compression::Fast);
    encoder.set_filter(png::Filter::Sub);
    let mut writer = encoder.write_header()?;
    let mut stream = writer.stream_writer()?;

    let width = params.width as usize;
    let rows_per_band = (BAND_BYTES / width).max(1) as u32;
    let mut band = vec![0u8; width * rows_per_band.min(params.height) as usize];
    let mut row = 0;
    while row < params.height {
        let rows = rows_per_band.min(params.height - row);
        let band = &mut band[..width * rows as usize];
        // Row by row, so a small image with many iterations still stops promptly.
        for (offset, line) in band.chunks_exact_mut(width).enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(RenderError::Cancelled);
            }
            render_rows(params, engine, row + offset as u32, line);
        }
        stream.write_all(band).map_err(png::EncodingError::from)?;
        row += rows;
    }
    stream.finish()?;
    writer.finish()?;
    Ok(())
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
    fn same_params_same_bytes() {
        let never = AtomicBool::new(false);
        let a = render_png(&params(), Engine::Scalar, &never).unwrap();
        let b = render_png(&params(), Engine::Scalar, &never).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.checksum, hex::encode(Sha256::digest(&a.bytes)));
        assert_eq!(&a.bytes[1..4], b"PNG");
    }

    #[test]
    fn cancelled_render_stops() {
        let cancelled = AtomicBool::new(true);
        let result = render_png(&params(), Engine::Scalar, &cancelled);
        assert!(matches!(result, Err(RenderError::Cancelled)));
    }
}
