//! The per-pixel iteration, and the choice of implementation. Every kernel must produce
//! exactly what [`escape_step`] does, pixel for pixel.

use crate::JuliaParams;

/// Which implementation of the iteration to run. All engines produce identical pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// The fastest kernel this CPU supports.
    #[default]
    Auto,
    /// The plain scalar loop, the reference for every other kernel.
    Scalar,
    /// Vector instructions (x86-64 AVX2); unavailable on other CPUs.
    Simd,
}

/// A kernel that can run on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// The engine asked for cannot run on this CPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {0:?} engine needs a CPU with AVX2, which this one lacks")]
pub struct EngineUnavailable(pub Engine);

impl Engine {
    /// The kernel this engine means on this machine.
    pub fn kernel(self) -> Result<Kernel, EngineUnavailable> {
        match self {
            Engine::Scalar => Ok(Kernel::Scalar),
            Engine::Auto => Ok(Engine::Simd.kernel().unwrap_or(Kernel::Scalar)),
            Engine::Simd => {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    return Ok(Kernel::Avx2);
                }
                Err(EngineUnavailable(self))
            }
        }
    }
}

/// The escape step of `z0` under `z -> z*z + c`: the `i` the original loop ends with,
/// that is the first `i` with `|z| > 2`, or `iterations - 1` if there is none.
///
/// `iterations` must be at least 1.
#[inline]
pub fn escape_step(z_re: f64, z_im: f64, c_re: f64, c_im: f64, iterations: u32) -> u32 {
    escape(z_re, z_im, c_re, c_im, iterations).unwrap_or(iterations.saturating_sub(1))
}

/// The first `i` with `|z| > 2`, or `None` if `z` stays within 2 for all iterations.
#[inline]
fn escape(z_re: f64, z_im: f64, c_re: f64, c_im: f64, iterations: u32) -> Option<u32> {
    escape_from(z_re, z_im, c_re, c_im, 0, iterations)
}

/// [`escape`] for a pixel already at step `from`, whose `z` is `(z_re, z_im)`: the first
/// `i` in `from..iterations` with `|z| > 2`.
#[inline]
pub(crate) fn escape_from(
    z_re: f64,
    z_im: f64,
    c_re: f64,
    c_im: f64,
    from: u32,
    iterations: u32,
) -> Option<u32> {
    let (mut re, mut im) = (z_re, z_im);
    for i in from..iterations {
        if magnitude_exceeds_two(re, im) {
            return Some(i);
        }
        (re, im) = advance(re, im, c_re, c_im);
    }
    None
}

/// A pixel's escape step and the `z` updates the original makes for it, given where its
/// loop ended (`None`: it never escaped).
#[inline]
pub(crate) fn step_and_updates(escape: Option<u32>, iterations: u32) -> (u32, u32) {
    match escape {
        Some(step) => (step, step),
        None => (iterations - 1, iterations),
    }
}

/// One update `z -> z*z + c`: the complex multiply as CPython computes it, then the add;
/// no fused multiply-add.
#[inline]
pub(crate) fn advance(re: f64, im: f64, c_re: f64, c_im: f64) -> (f64, f64) {
    let next_re = re * re - im * im;
    let next_im = re * im + im * re;
    (next_re + c_re, next_im + c_im)
}

/// The palette index of escape step `i`: the colour `(i%8*32, i%16*16, i%32*8)` depends
/// only on `i % 32`.
#[inline]
pub fn palette_index(step: u32) -> u8 {
    (step % 32) as u8
}

/// Where `re*re + im*im` is too close to 4 to decide `|z| > 2` from it.
pub(crate) const BAND: f64 = 1e-12;

/// `hypot(re, im) > 2.0`, exactly as the original decides it, but usually without the
/// cost of `hypot`: `re*re + im*im` is within a few ulps of `|z|^2`, so only values in a
/// thin band around 4 need the exact (libm) answer.
#[inline]
pub(crate) fn magnitude_exceeds_two(re: f64, im: f64) -> bool {
    let squared = re * re + im * im;
    if squared > 4.0 + BAND {
        true
    } else if squared < 4.0 - BAND {
        false
    } else {
        re.hypot(im) > 2.0
    }
}

/// The real coordinate of every column, computed once per image.
pub fn column_coordinates(params: &JuliaParams) -> Vec<f64> {
    (0..params.width).map(|x| params.column_re(x)).collect()
}

/// Renders rows `first_row..` into `out` (one palette index per pixel, row-major, whole
/// rows of `columns.len()` pixels) and returns the number of iterations the original
/// algorithm performs for them (`z` updates, summed over pixels). `columns` are the
/// image's [`column_coordinates`]. Several rows at once keep the vector lanes busier than
/// one.
///
/// Panics if `out` is not whole rows inside the image; callers size it.
pub fn render_rows(
    params: &JuliaParams,
    kernel: Kernel,
    columns: &[f64],
    first_row: u32,
    out: &mut [u8],
) -> u64 {
    let width = columns.len();
    assert!(
        width == params.width as usize && out.len().is_multiple_of(width),
        "output is not whole rows"
    );
    let rows = (out.len() / width) as u32;
    assert!(first_row + rows <= params.height, "rows past the image");
    let (cx, cy, iterations) = (params.cx, params.cy, params.iterations);
    match kernel {
        Kernel::Scalar => out
            .chunks_exact_mut(width)
            .zip(first_row..)
            .map(|(row, y)| scalar_row(columns, params.row_im(y), cx, cy, iterations, row))
            .sum(),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            let ims: Vec<f64> = (first_row..first_row + rows)
                .map(|y| params.row_im(y))
                .collect();
            // SAFETY: `Kernel::Avx2` is only handed out after detecting AVX2.
            unsafe { crate::simd::avx2::render_rows(columns, &ims, cx, cy, iterations, out) }
        }
    }
}

/// The scalar kernel over one row. Not inlined, so that it compiles the same wherever it
/// is called from (inlined into a rayon closure it lost a third of its speed).
#[inline(never)]
fn scalar_row(columns: &[f64], im: f64, cx: f64, cy: f64, iterations: u32, out: &mut [u8]) -> u64 {
    let mut work = 0;
    for (pixel, &re) in out.iter_mut().zip(columns) {
        let (step, updates) = step_and_updates(escape(re, im, cx, cy, iterations), iterations);
        work += u64::from(updates);
        *pixel = palette_index(step);
    }
    work
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

    #[test]
    fn work_counts_updates() {
        let params = JuliaParams {
            width: 2,
            height: 1,
            iterations: 10,
            xa: 3.0,
            xb: 0.0,
            ya: 0.0,
            yb: 0.0,
            cx: 0.0,
            cy: 0.0,
        };
        let mut out = [0u8; 2];
        // (3, 0) escapes at once: 0 updates; (0, 0) never does: 10 updates.
        assert_eq!(
            render_rows(
                &params,
                Kernel::Scalar,
                &column_coordinates(&params),
                0,
                &mut out
            ),
            10
        );
        assert_eq!(out, [0, 9]);
        // A point that escapes exactly at the last step made as many updates as its step.
        let last = JuliaParams {
            width: 1,
            iterations: 2,
            xa: 1.5,
            ..params
        };
        let mut one = [0u8; 1];
        assert_eq!(
            render_rows(
                &last,
                Kernel::Scalar,
                &column_coordinates(&last),
                0,
                &mut one
            ),
            1
        );
    }
}
