//! The per-pixel iteration. Every engine must produce exactly what [`escape_step`] does.

use crate::JuliaParams;

/// Which implementation of the iteration to run. All engines produce identical pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// The plain scalar loop, the reference for every other engine.
    #[default]
    Scalar,
}

/// The escape step of `z0` under `z -> z*z + c`: the `i` the original loop ends with,
/// that is the first `i` with `|z| > 2`, or `iterations - 1` if there is none.
///
/// `iterations` must be at least 1.
#[inline]
pub fn escape_step(z_re: f64, z_im: f64, c_re: f64, c_im: f64, iterations: u32) -> u32 {
    let (mut re, mut im) = (z_re, z_im);
    for i in 0..iterations {
        if magnitude_exceeds_two(re, im) {
            return i;
        }
        // Complex multiply as CPython computes it, then the add; no fused multiply-add.
        let next_re = re * re - im * im;
        let next_im = re * im + im * re;
        re = next_re + c_re;
        im = next_im + c_im;
    }
    iterations.saturating_sub(1)
}

/// The palette index of escape step `i`: the colour `(i%8*32, i%16*16, i%32*8)` depends
/// only on `i % 32`.
#[inline]
pub fn palette_index(step: u32) -> u8 {
    (step % 32) as u8
}

/// `hypot(re, im) > 2.0`, exactly as the original decides it, but usually without the
/// cost of `hypot`: `re*re + im*im` is within a few ulps of `|z|^2`, so only values in a
/// thin band around 4 need the exact (libm) answer.
#[inline]
fn magnitude_exceeds_two(re: f64, im: f64) -> bool {
    const BAND: f64 = 1e-12;
    let squared = re * re + im * im;
    if squared > 4.0 + BAND {
        true
    } else if squared < 4.0 - BAND {
        false
    } else {
        re.hypot(im) > 2.0
    }
}

/// Renders rows `first_row..first_row + out.len() / width` into `out` as palette indices,
/// one byte per pixel, row-major.
///
/// Panics if `out.len()` is not a whole number of rows inside the image; callers size it.
pub fn render_rows(params: &JuliaParams, engine: Engine, first_row: u32, out: &mut [u8]) {
    let width = params.width as usize;
    assert!(
        width > 0 && out.len().is_multiple_of(width),
        "output is not whole rows"
    );
    let rows = (out.len() / width) as u32;
    assert!(first_row + rows <= params.height, "rows past the image");
    match engine {
        Engine::Scalar => {
            for (offset, row) in out.chunks_exact_mut(width).enumerate() {
                let im = params.row_im(first_row + offset as u32);
                for (x, pixel) in row.iter_mut().enumerate() {
                    let re = params.column_re(x as u32);
                    *pixel =
                        palette_index(escape_step(re, im, params.cx, params.cy, params.iterations));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_never_escapes_for_c_zero() {
        assert_eq!(escape_step(0.0, 0.0, 0.0, 0.0, 50), 49);
    }

    #[test]
    fn far_point_escapes_at_step_zero() {
        assert_eq!(escape_step(3.0, 0.0, 0.0, 0.0, 50), 0);
    }

    #[test]
    fn exactly_two_is_not_outside() {
        // |z| == 2 exactly does not escape (the test is strict), and with c = 0 it squares to 4.
        assert_eq!(escape_step(2.0, 0.0, 0.0, 0.0, 10), 1);
        assert_eq!(escape_step(0.0, -2.0, 0.0, 0.0, 10), 1);
    }

    #[test]
    fn escape_step_counts_iterations() {
        // z = 1.5: step 0 |z|=1.5, z -> 2.25 > 2 at step 1.
        assert_eq!(escape_step(1.5, 0.0, 0.0, 0.0, 10), 1);
        // One iteration only: the loop ends at i = 0 either way.
        assert_eq!(escape_step(0.1, 0.0, 0.0, 0.0, 1), 0);
    }

    #[test]
    fn band_uses_exact_hypot() {
        // Just above and just below 2 along the diagonal, where re*re + im*im rounds.
        let s = 2.0f64 / 2f64.sqrt();
        for k in -4i64..=4 {
            let re = f64::from_bits((s.to_bits() as i64 + k) as u64);
            assert_eq!(magnitude_exceeds_two(re, s), re.hypot(s) > 2.0, "k={k}");
        }
    }
}
