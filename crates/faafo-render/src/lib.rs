//! The Julia-set renderer of faafo: pure computation, no I/O.
//!
//! A render is a pure function of [`JuliaParams`]: the same parameters give the same
//! pixels and the same PNG bytes on every machine, which is what makes redelivered
//! tasks harmless (at-least-once execution, exactly-once results).
//!
//! The pixel rule is the original faafo worker's, bit for bit:
//! `zy = y*(yb-ya)/(height-1)+ya`, `zx = x*(xb-xa)/(width-1)+xa`, then
//! `for i in 0..iterations { if |z| > 2 { break } z = z*z + c }`, and the colour of
//! the last `i` is `(i%8*32, i%16*16, i%32*8)`.

mod constant;
mod encode;
mod kernel;
mod simd;

pub use constant::{ConstantChoice, choose_constant};
pub use encode::{
    DecodeError, IndexedImage, PALETTE, RenderError, RenderStats, RenderedPng, decode_indexed,
    png_dimensions, render_png, render_png_to,
};
pub use kernel::{
    Engine, EngineUnavailable, Kernel, column_coordinates, escape_step, palette_index, render_rows,
};

/// Everything a render depends on. Validation of user input happens in `faafo-core`;
/// this type only assumes `width >= 1`, `height >= 1` and `iterations >= 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JuliaParams {
    pub width: u32,
    pub height: u32,
    pub iterations: u32,
    pub xa: f64,
    pub xb: f64,
    pub ya: f64,
    pub yb: f64,
    /// Real part of the constant `c`.
    pub cx: f64,
    /// Imaginary part of the constant `c`.
    pub cy: f64,
}

impl JuliaParams {
    /// The real coordinate of column `x`, evaluated in the original's order.
    #[inline]
    pub fn column_re(&self, x: u32) -> f64 {
        axis_value(x, self.width, self.xa, self.xb)
    }

    /// The imaginary coordinate of row `y`, evaluated in the original's order.
    #[inline]
    pub fn row_im(&self, y: u32) -> f64 {
        axis_value(y, self.height, self.ya, self.yb)
    }

    /// The same fractal (window, `c`, iterations) at most [`PREVIEW_MAX_SIDE`] pixels on
    /// its long side, for galleries; `None` when the image is no larger than that and so
    /// is its own preview.
    pub fn preview(&self) -> Option<JuliaParams> {
        let long = self.width.max(self.height);
        if long <= PREVIEW_MAX_SIDE {
            return None;
        }
        let scale = |side: u32| {
            let scaled = (u64::from(side) * u64::from(PREVIEW_MAX_SIDE) + u64::from(long) / 2)
                / u64::from(long);
            scaled.max(1) as u32
        };
        Some(JuliaParams {
            width: scale(self.width),
            height: scale(self.height),
            ..*self
        })
    }
}

/// The longest side of a preview, in pixels: sharp in a gallery card on a high-density
/// screen, and a few tens of kilobytes.
pub const PREVIEW_MAX_SIDE: u32 = 512;

/// `k*(b-a)/(n-1)+a` in f64, in that order. The original divides by zero when `n == 1`;
/// the only sensible coordinate of a single row or column is `a`.
#[inline]
fn axis_value(k: u32, n: u32, a: f64, b: f64) -> f64 {
    if n <= 1 {
        return a;
    }
    f64::from(k) * (b - a) / f64::from(n - 1) + a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(width: u32, height: u32) -> JuliaParams {
        JuliaParams {
            width,
            height,
            iterations: 64,
            xa: -1.5,
            xb: 1.5,
            ya: -1.0,
            yb: 1.0,
            cx: -0.8,
            cy: 0.156,
        }
    }

    fn preview_size(width: u32, height: u32) -> Option<(u32, u32)> {
        sized(width, height).preview().map(|p| (p.width, p.height))
    }

    #[test]
    fn previews_keep_the_shape_and_the_fractal_within_the_longest_side() {
        assert_eq!(preview_size(9999, 9999), Some((512, 512)));
        assert_eq!(preview_size(600, 400), Some((512, 341)));
        assert_eq!(preview_size(400, 600), Some((341, 512)));
        assert_eq!(preview_size(513, 10), Some((512, 10)));
        assert_eq!(preview_size(9999, 1), Some((512, 1)));
        let preview = sized(2000, 1000).preview().unwrap();
        assert_eq!(
            (
                preview.xa, preview.xb, preview.ya, preview.yb, preview.cx, preview.cy
            ),
            (-1.5, 1.5, -1.0, 1.0, -0.8, 0.156)
        );
        assert_eq!(preview.iterations, 64);
    }

    #[test]
    fn small_images_are_their_own_preview() {
        assert_eq!(preview_size(512, 512), None);
        assert_eq!(preview_size(512, 100), None);
        assert_eq!(preview_size(1, 1), None);
    }
}
