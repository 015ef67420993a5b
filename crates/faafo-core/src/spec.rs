//! Turning a client's request into a [`FractalSpec`] that is safe to render.

use faafo_render::{JuliaParams, choose_constant};

use crate::wire::CreateFractal;

/// Size limits for a single fractal. A request past any of them is refused before it
/// is stored, so no worker ever starts a task it cannot finish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_iterations: u32,
    /// Upper bound of `width * height * iterations`, the worst-case cost of a render.
    pub max_work: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_width: 10_000,
            max_height: 10_000,
            max_iterations: 100_000,
            max_work: 5e11,
        }
    }
}

/// The region of the complex plane an image covers: real axis `xa..xb`, imaginary `ya..yb`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub xa: f64,
    pub xb: f64,
    pub ya: f64,
    pub yb: f64,
}

/// A fractal request that passed validation, with its constant `c` decided.
/// A render is a pure function of this value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FractalSpec {
    width: u32,
    height: u32,
    iterations: u32,
    window: Window,
    cx: f64,
    cy: f64,
    /// The seed `c` was chosen from, or `None` when the client gave `c`.
    seed: Option<u64>,
}

/// A request field that is not acceptable, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

impl SpecError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        SpecError {
            field,
            message: message.into(),
        }
    }
}

impl FractalSpec {
    /// Validates `request` against `limits`. When the request has no `cx`/`cy`, `c` is
    /// chosen by the original's rule from `seed`.
    pub fn parse(
        request: &CreateFractal,
        limits: &Limits,
        seed: u64,
    ) -> Result<FractalSpec, SpecError> {
        check_count("width", request.width, limits.max_width)?;
        check_count("height", request.height, limits.max_height)?;
        check_count("iterations", request.iterations, limits.max_iterations)?;
        let work = work(request.width, request.height, request.iterations);
        if work > limits.max_work {
            return Err(SpecError::new(
                "iterations",
                format!(
                    "width * height * iterations is {work:.0}, more than the limit of {:.0}; ask for a smaller image or fewer iterations",
                    limits.max_work
                ),
            ));
        }
        for (field, value) in [
            ("xa", request.xa),
            ("xb", request.xb),
            ("ya", request.ya),
            ("yb", request.yb),
        ] {
            check_finite(field, value)?;
        }
        if request.xa == request.xb {
            return Err(SpecError::new(
                "xb",
                "xa and xb must differ, or the image has no width in the plane",
            ));
        }
        if request.ya == request.yb {
            return Err(SpecError::new(
                "yb",
                "ya and yb must differ, or the image has no height in the plane",
            ));
        }
        let window = Window {
            xa: request.xa,
            xb: request.xb,
            ya: request.ya,
            yb: request.yb,
        };
        let (cx, cy, seed) = match (request.cx, request.cy) {
            (Some(cx), Some(cy)) => {
                check_finite("cx", cx)?;
                check_finite("cy", cy)?;
                (cx, cy, None)
            }
            (None, None) => {
                let c = choose_constant(
                    window.xa,
                    window.xb,
                    window.ya,
                    window.yb,
                    request.iterations,
                    seed,
                );
                (c.cx, c.cy, Some(seed))
            }
            (Some(_), None) => {
                return Err(SpecError::new(
                    "cy",
                    "cx and cy go together: give both or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(SpecError::new(
                    "cx",
                    "cx and cy go together: give both or neither",
                ));
            }
        };
        Ok(FractalSpec {
            width: request.width,
            height: request.height,
            iterations: request.iterations,
            window,
            cx,
            cy,
            seed,
        })
    }

    /// Rebuilds a spec from stored columns, which were validated when they were written.
    pub fn from_stored(
        width: u32,
        height: u32,
        iterations: u32,
        window: Window,
        cx: f64,
        cy: f64,
        seed: Option<u64>,
    ) -> FractalSpec {
        FractalSpec {
            width,
            height,
            iterations,
            window,
            cx,
            cy,
            seed,
        }
    }

    pub fn width(&self) -> u32 {
        self.width
    }
    pub fn height(&self) -> u32 {
        self.height
    }
    pub fn iterations(&self) -> u32 {
        self.iterations
    }
    /// width x height x iterations: what `Limits::max_work` and client quotas count.
    pub fn work(&self) -> f64 {
        work(self.width, self.height, self.iterations)
    }
    pub fn window(&self) -> Window {
        self.window
    }
    pub fn cx(&self) -> f64 {
        self.cx
    }
    pub fn cy(&self) -> f64 {
        self.cy
    }
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// Whether a repeated create asks for this same fractal: the same size, iterations and
    /// window, and the same `c` if the request names one.
    pub fn matches_request(&self, request: &CreateFractal) -> bool {
        let w = self.window;
        let same_c = match (request.cx, request.cy) {
            (Some(cx), Some(cy)) => cx == self.cx && cy == self.cy,
            _ => true,
        };
        self.width == request.width
            && self.height == request.height
            && self.iterations == request.iterations
            && (w.xa, w.xb, w.ya, w.yb) == (request.xa, request.xb, request.ya, request.yb)
            && same_c
    }

    pub fn render_params(&self) -> JuliaParams {
        let w = self.window;
        JuliaParams {
            width: self.width,
            height: self.height,
            iterations: self.iterations,
            xa: w.xa,
            xb: w.xb,
            ya: w.ya,
            yb: w.yb,
            cx: self.cx,
            cy: self.cy,
        }
    }
}

fn check_count(field: &'static str, value: u32, max: u32) -> Result<(), SpecError> {
    if value == 0 || value > max {
        return Err(SpecError::new(
            field,
            format!("must be between 1 and {max}, got {value}"),
        ));
    }
    Ok(())
}

fn check_finite(field: &'static str, value: f64) -> Result<(), SpecError> {
    if !value.is_finite() {
        return Err(SpecError::new(
            field,
            format!("must be a finite number, got {value}"),
        ));
    }
    Ok(())
}

/// What a render costs: width x height x iterations, as a float (it passes u64 range
/// long before any limit is checked).
fn work(width: u32, height: u32, iterations: u32) -> f64 {
    f64::from(width) * f64::from(height) * f64::from(iterations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CreateFractal {
        CreateFractal {
            uuid: None,
            width: 64,
            height: 32,
            iterations: 128,
            xa: -2.0,
            xb: 2.0,
            ya: -1.5,
            yb: 1.5,
            cx: None,
            cy: None,
        }
    }

    fn field_of(request: CreateFractal) -> &'static str {
        FractalSpec::parse(&request, &Limits::default(), 1)
            .unwrap_err()
            .field
    }

    #[test]
    fn valid_request_chooses_c_from_the_seed() {
        let spec = FractalSpec::parse(&request(), &Limits::default(), 9).unwrap();
        assert_eq!(spec.seed(), Some(9));
        assert_eq!(
            spec,
            FractalSpec::parse(&request(), &Limits::default(), 9).unwrap()
        );
        assert!(spec.matches_request(&request()));
    }

    #[test]
    fn given_c_is_kept() {
        let spec = FractalSpec::parse(
            &CreateFractal {
                cx: Some(-0.8),
                cy: Some(0.156),
                ..request()
            },
            &Limits::default(),
            1,
        )
        .unwrap();
        assert_eq!((spec.cx(), spec.cy(), spec.seed()), (-0.8, 0.156, None));
        assert!(!spec.matches_request(&CreateFractal {
            cx: Some(-0.7),
            cy: Some(0.156),
            ..request()
        }));
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(
            field_of(CreateFractal {
                width: 0,
                ..request()
            }),
            "width"
        );
        assert_eq!(
            field_of(CreateFractal {
                height: 10_001,
                ..request()
            }),
            "height"
        );
        assert_eq!(
            field_of(CreateFractal {
                iterations: 100_001,
                ..request()
            }),
            "iterations"
        );
        assert_eq!(
            field_of(CreateFractal {
                width: 10_000,
                height: 10_000,
                iterations: 5001,
                ..request()
            }),
            "iterations"
        );
        assert_eq!(
            field_of(CreateFractal {
                xa: f64::NAN,
                ..request()
            }),
            "xa"
        );
        assert_eq!(
            field_of(CreateFractal {
                yb: f64::INFINITY,
                ..request()
            }),
            "yb"
        );
        assert_eq!(
            field_of(CreateFractal {
                xb: -2.0,
                ..request()
            }),
            "xb"
        );
        assert_eq!(
            field_of(CreateFractal {
                yb: -1.5,
                ..request()
            }),
            "yb"
        );
        assert_eq!(
            field_of(CreateFractal {
                cx: Some(0.1),
                ..request()
            }),
            "cy"
        );
        assert_eq!(
            field_of(CreateFractal {
                cx: Some(f64::NAN),
                cy: Some(0.0),
                ..request()
            }),
            "cx"
        );
    }

    #[test]
    fn limit_is_stated_in_the_message() {
        let error = FractalSpec::parse(
            &CreateFractal {
                width: 20_000,
                ..request()
            },
            &Limits::default(),
            1,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "width: must be between 1 and 10000, got 20000"
        );
    }
}
