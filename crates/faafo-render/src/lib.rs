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
    PALETTE, RenderError, RenderStats, RenderedPng, png_dimensions, render_png, render_png_to,
};
pub use kernel::{
    Engine, EngineUnavailable, Kernel, column_coordinates, escape_step, palette_index, render_row,
    render_rows,
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
}

/// `k*(b-a)/(n-1)+a` in f64, in that order. The original divides by zero when `n == 1`;
/// the only sensible coordinate of a single row or column is `a`.
#[inline]
fn axis_value(k: u32, n: u32, a: f64, b: f64) -> f64 {
    if n <= 1 {
        return a;
    }
    f64::from(k) * (b - a) / f64::from(n - 1) + a
}
