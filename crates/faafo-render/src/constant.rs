//! Choosing the constant `c` the way the original worker did, but reproducibly and in
//! bounded time.

use crate::kernel::escape_step;

/// How many random candidates to try before giving up on the original's rule.
const MAX_CANDIDATES: u32 = 10_000;

/// The original accepts `c` when its own escape step is strictly inside this range.
const ACCEPTED_STEPS: std::ops::RangeInclusive<u32> = 11..=99;

/// The outcome of [`choose_constant`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConstantChoice {
    pub cx: f64,
    pub cy: f64,
    /// The escape step of `c` itself, as the rule measures it.
    pub escape_step: u32,
    /// False when no candidate met the rule (the original would loop forever, for example
    /// with fewer than 12 iterations) and the candidate with the highest escape step was kept.
    pub met_rule: bool,
}

/// Picks `c` as the original worker did: a uniformly random point of the window whose own
/// escape step (starting from `z = c`) is strictly between 10 and 100.
///
/// The randomness comes from `seed` through SplitMix64, written out here so the choice
/// never changes with a dependency's version.
pub fn choose_constant(
    xa: f64,
    xb: f64,
    ya: f64,
    yb: f64,
    iterations: u32,
    seed: u64,
) -> ConstantChoice {
    // Steps of 100 or more are all rejected, so 101 iterations decide the rule exactly
    // while bounding the cost of each candidate.
    let budget = iterations.clamp(1, 101);
    let mut state = seed;
    let mut best: Option<ConstantChoice> = None;
    for _ in 0..MAX_CANDIDATES {
        let cx = unit_interval(splitmix64(&mut state)) * (xb - xa) + xa;
        let cy = unit_interval(splitmix64(&mut state)) * (yb - ya) + ya;
        let step = escape_step(cx, cy, cx, cy, budget);
        let candidate = ConstantChoice {
            cx,
            cy,
            escape_step: step,
            met_rule: ACCEPTED_STEPS.contains(&step),
        };
        if candidate.met_rule {
            return candidate;
        }
        if best.is_none_or(|b| step > b.escape_step) {
            best = Some(candidate);
        }
    }
    best.expect("MAX_CANDIDATES is not zero")
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform f64 in `[0, 1)` from the top 53 bits.
fn unit_interval(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_is_reproducible_and_meets_the_rule() {
        let a = choose_constant(-2.0, 2.0, -1.5, 1.5, 256, 42);
        let b = choose_constant(-2.0, 2.0, -1.5, 1.5, 256, 42);
        assert_eq!(a, b);
        assert!(a.met_rule);
        assert!(a.escape_step > 10 && a.escape_step < 100);
        assert!((-2.0..2.0).contains(&a.cx) && (-1.5..1.5).contains(&a.cy));
        assert_eq!(escape_step(a.cx, a.cy, a.cx, a.cy, 256), a.escape_step);
    }

    #[test]
    fn different_seeds_give_different_constants() {
        let a = choose_constant(-2.0, 2.0, -1.5, 1.5, 256, 1);
        let b = choose_constant(-2.0, 2.0, -1.5, 1.5, 256, 2);
        assert_ne!((a.cx, a.cy), (b.cx, b.cy));
    }

    #[test]
    fn too_few_iterations_terminates_with_best_candidate() {
        // With 5 iterations no step can exceed 4: the original loops forever here.
        let choice = choose_constant(-2.0, 2.0, -1.5, 1.5, 5, 7);
        assert!(!choice.met_rule);
        assert_eq!(choice.escape_step, 4);
    }

    #[test]
    fn window_inside_the_set_terminates() {
        // Every c near 0 is in the Mandelbrot set, so no step is below 100.
        let choice = choose_constant(-0.01, 0.01, -0.01, 0.01, 100_000, 3);
        assert!(!choice.met_rule);
    }
}
