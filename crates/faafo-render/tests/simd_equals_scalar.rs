//! Every engine must produce the scalar kernel's pixels, bit for bit.

use faafo_render::{Engine, JuliaParams, Kernel, column_coordinates, render_rows};
use proptest::prelude::*;

fn simd() -> Kernel {
    Engine::Simd
        .kernel()
        .expect("the test machine has AVX2 (x86-64 v3); the SIMD path must be tested")
}

/// Renders the image with `kernel`: the palette indices and the work count. Each
/// engine is asked for all rows at once and for one row at a time, and must give the same
/// either way.
fn render(params: &JuliaParams, kernel: Kernel) -> (Vec<u8>, u64) {
    let columns = column_coordinates(params);
    let mut whole = vec![0u8; (params.width * params.height) as usize];
    let whole_work = render_rows(params, kernel, &columns, 0, &mut whole);
    let mut by_row = vec![0u8; whole.len()];
    let by_row_work = by_row
        .chunks_exact_mut(params.width as usize)
        .zip(0..)
        .map(|(row, y)| render_rows(params, kernel, &columns, y, row))
        .sum();
    assert_eq!(
        (&whole, whole_work),
        (&by_row, by_row_work),
        "{kernel:?}: all rows at once differ from one at a time"
    );
    (whole, whole_work)
}

fn finite(range: std::ops::Range<f64>) -> impl Strategy<Value = f64> {
    range
}

prop_compose! {
    fn window()(xa in finite(-4.0..0.0), dx in 0.001f64..6.0, ya in finite(-3.0..0.0), dy in 0.001f64..5.0)
        -> (f64, f64, f64, f64) { (xa, xa + dx, ya, ya + dy) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn simd_equals_scalar_on_random_windows(
        (xa, xb, ya, yb) in window(),
        cx in -1.5f64..1.0,
        cy in -1.0f64..1.0,
        // Widths around and between multiples of the 16-pixel block.
        width in 1u32..70,
        height in 1u32..12,
        iterations in 1u32..600,
    ) {
        let params = JuliaParams { width, height, iterations, xa, xb, ya, yb, cx, cy };
        prop_assert_eq!(render(&params, simd()), render(&params, Kernel::Scalar));
    }

    #[test]
    fn simd_equals_scalar_where_escape_times_vary_most(
        // Small windows near the boundary of connected Julia sets: neighbouring pixels
        // escape after very different numbers of steps, or never, so lanes finish at
        // different times and take new pixels mid-flight, across rows.
        centre_re in -0.6f64..0.6,
        centre_im in -0.6f64..0.6,
        span in 1e-4f64..0.5,
        angle in 0.0f64..std::f64::consts::TAU,
        width in 1u32..90,
        height in 1u32..24,
        iterations in 9u32..2000,
    ) {
        // c on a circle inside the main cardioid's neighbourhood: sets with wide boundaries.
        let (cx, cy) = (0.7885 * angle.cos(), 0.7885 * angle.sin());
        let params = JuliaParams {
            width, height, iterations, cx, cy,
            xa: centre_re - span, xb: centre_re + span,
            ya: centre_im - span, yb: centre_im + span,
        };
        prop_assert_eq!(render(&params, simd()), render(&params, Kernel::Scalar));
    }

    #[test]
    fn simd_equals_scalar_on_the_circle_of_radius_two(
        radius_ulps in -64i64..64,
        angle in 0.0f64..std::f64::consts::TAU,
        iterations in 1u32..50,
    ) {
        // Windows whose corner sits within a few ulps of |z| = 2: the exact fallback decides.
        let r = f64::from_bits((2.0f64.to_bits() as i64 + radius_ulps) as u64);
        let (re, im) = (r * angle.cos(), r * angle.sin());
        let params = JuliaParams { width: 19, height: 3, iterations, xa: re, xb: re + 1e-9, ya: im, yb: im + 1e-9, cx: 0.0, cy: 0.0 };
        prop_assert_eq!(render(&params, simd()), render(&params, Kernel::Scalar));
    }

    #[test]
    fn simd_equals_scalar_where_a_later_step_lands_on_the_circle(
        // With c = 0, |z0| = 2^(1/2^k) puts |z| within a few ulps of 2 at step k: the
        // exact rule decides in whichever round of the SIMD kernel that step falls.
        halvings in 0u32..7,
        radius_ulps in -16i64..16,
        angle in 0.0f64..std::f64::consts::TAU,
        iterations in 1u32..80,
    ) {
        let radius = 2f64.powf(0.5f64.powi(halvings as i32));
        let r = f64::from_bits((radius.to_bits() as i64 + radius_ulps) as u64);
        let (re, im) = (r * angle.cos(), r * angle.sin());
        let params = JuliaParams { width: 37, height: 2, iterations, xa: re, xb: re + 1e-12, ya: im, yb: im + 1e-12, cx: 0.0, cy: 0.0 };
        prop_assert_eq!(render(&params, simd()), render(&params, Kernel::Scalar));
    }

    #[test]
    fn simd_equals_scalar_for_constants_far_outside_the_set(
        // |c| > 1.97: past |z| = 2 a point may come back (z*z + c can be small), so the
        // SIMD kernel marks an escaped lane instead of trusting |z| to keep growing.
        (xa, xb, ya, yb) in window(),
        radius in 1.9f64..4.0,
        angle in 0.0f64..std::f64::consts::TAU,
        width in 1u32..40,
        height in 1u32..6,
        iterations in 1u32..300,
    ) {
        let (cx, cy) = (radius * angle.cos(), radius * angle.sin());
        let params = JuliaParams { width, height, iterations, xa, xb, ya, yb, cx, cy };
        prop_assert_eq!(render(&params, simd()), render(&params, Kernel::Scalar));
    }

    #[test]
    fn simd_equals_scalar_on_windows_read_right_to_left_or_bottom_to_top(
        (xa, xb, ya, yb) in window(),
        cx in -1.5f64..1.0,
        cy in -1.0f64..1.0,
        width in 1u32..50,
        height in 1u32..6,
        iterations in 1u32..300,
    ) {
        // xa > xb and ya > yb: columns fall from left to right, rows from top to bottom.
        let params = JuliaParams { width, height, iterations, xa: xb, xb: xa, ya: yb, yb: ya, cx, cy };
        prop_assert_eq!(render(&params, simd()), render(&params, Kernel::Scalar));
    }
}

#[test]
fn simd_equals_scalar_on_the_heavy_case() {
    let params = JuliaParams {
        width: 301,
        height: 64,
        iterations: 512,
        xa: -1.6,
        xb: 1.6,
        ya: -1.2,
        yb: 1.2,
        cx: -0.8,
        cy: 0.156,
    };
    assert_eq!(render(&params, simd()), render(&params, Kernel::Scalar));
}

#[test]
fn simd_equals_scalar_for_points_that_never_escape() {
    let params = JuliaParams {
        width: 33,
        height: 5,
        iterations: 3000,
        xa: -0.05,
        xb: 0.05,
        ya: -0.05,
        yb: 0.05,
        cx: -1.0,
        cy: 0.0,
    };
    let (pixels, work) = render(&params, simd());
    assert_eq!((pixels.clone(), work), render(&params, Kernel::Scalar));
    assert_eq!(work, 33 * 5 * 3000, "every pixel made every update");
}
