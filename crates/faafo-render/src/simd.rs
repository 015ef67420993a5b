//! Vector kernels. Each lane performs exactly the scalar kernel's operations, in the same
//! order and without fused multiply-add, so pixels are bit-identical to the scalar path.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::{
        __m256d, _CMP_GT_OQ, _mm256_add_pd, _mm256_and_pd, _mm256_andnot_pd, _mm256_blendv_pd,
        _mm256_cmp_pd, _mm256_loadu_pd, _mm256_movemask_pd, _mm256_mul_pd, _mm256_set1_pd,
        _mm256_setzero_pd, _mm256_storeu_pd, _mm256_sub_pd,
    };

    use crate::kernel::{BAND, magnitude_exceeds_two, palette_index};

    /// Repeats `$body` with `$k` bound to each literal index in turn. Arrays of registers
    /// indexed this way stay in registers; a `for` loop over them would leave them in
    /// memory until the loop is unrolled, too late for LLVM to undo it.
    macro_rules! unrolled {
        ($k:ident in [$($index:literal),*] $body:block) => {
            $({
                let $k: usize = $index;
                $body
            })*
        };
    }

    /// f64 lanes in one AVX2 register.
    const LANES: usize = 4;
    /// Registers iterated together: one iteration is a chain of about 9 cycles of latency
    /// (multiply, subtract, add), so four independent chains keep the add units busy.
    const SLOTS: usize = 4;
    /// A slot that has no pixels left.
    const IDLE: u64 = u64::MAX;

    /// Steps every pixel takes in the vector pre-pass before the slots take over.
    const PREPASS_STEPS: u32 = 8;
    /// Pixels still iterating after the pre-pass, gathered before the slots run them.
    const SURVIVORS: usize = 256;

    /// Renders one row whose column coordinates are `columns` and imaginary part `im`,
    /// returning the `z` updates the original algorithm performs for it.
    ///
    /// Most pixels of a typical image escape within a few steps, so every group of four
    /// pixels first runs up to `PREPASS_STEPS` steps in a short vector loop. The pixels
    /// still iterating after that go on in [`iterate_survivors`].
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn render_row(
        columns: &[f64],
        im: f64,
        cr: f64,
        ci: f64,
        iterations: u32,
        out: &mut [u8],
    ) -> u64 {
        let prepass = iterations.min(PREPASS_STEPS);
        let mut survivors = Survivors::new();
        let mut work = 0;
        let z_im = _mm256_set1_pd(im);
        let width = columns.len();
        let mut first = 0;
        while first < width {
            let pixels = (width - first).min(PAIR);
            let z_re = if pixels == PAIR {
                // SAFETY: 8 f64 from `first` are inside `columns`.
                unsafe {
                    [
                        _mm256_loadu_pd(columns.as_ptr().add(first)),
                        _mm256_loadu_pd(columns.as_ptr().add(first + LANES)),
                    ]
                }
            } else {
                // The row's last pixels: spare lanes repeat the last one and are dropped.
                let mut re = [columns[width - 1]; PAIR];
                re[..pixels].copy_from_slice(&columns[first..]);
                // SAFETY: reads 8 f64 from an 8-element array.
                unsafe {
                    [
                        _mm256_loadu_pd(re.as_ptr()),
                        _mm256_loadu_pd(re.as_ptr().add(LANES)),
                    ]
                }
            };
            let outcome = prepass_pair(z_re, z_im, cr, ci, prepass);
            if outcome.all_escaped && pixels == PAIR {
                // The common case, without a branch per pixel.
                let steps = outcome.escaped_at.map(|step| step as u32);
                for (pixel, step) in out[first..first + PAIR].iter_mut().zip(steps) {
                    *pixel = palette_index(step);
                }
                work += steps.iter().map(|&step| u64::from(step)).sum::<u64>();
                first += PAIR;
                continue;
            }
            for lane in 0..pixels {
                let pixel = first + lane;
                let step = outcome.escaped_at[lane];
                if step >= 0.0 {
                    out[pixel] = palette_index(step as u32);
                    work += step as u64;
                } else if iterations == prepass {
                    out[pixel] = palette_index(iterations - 1);
                    work += u64::from(iterations);
                } else {
                    survivors.push(pixel, outcome.re[lane], outcome.im[lane]);
                    if survivors.len == SURVIVORS {
                        work += iterate_survivors(&survivors, cr, ci, prepass, iterations, out);
                        survivors.len = 0;
                    }
                }
            }
            first += pixels;
        }
        if survivors.len > 0 {
            work += iterate_survivors(&survivors, cr, ci, prepass, iterations, out);
        }
        work
    }

    /// Pixels the pre-pass iterates together: two registers, two independent chains.
    const PAIR: usize = 2 * LANES;

    /// What the pre-pass left of eight pixels: escape steps (negative while still going)
    /// and `z` of the lanes still going.
    struct Prepassed {
        all_escaped: bool,
        escaped_at: [f64; PAIR],
        re: [f64; PAIR],
        im: [f64; PAIR],
    }

    /// Runs up to `steps` steps on eight pixels of a row, recording escapes with vector
    /// blends rather than branches.
    #[target_feature(enable = "avx2")]
    fn prepass_pair(
        mut z_re: [__m256d; 2],
        z_im: __m256d,
        cr: f64,
        ci: f64,
        steps: u32,
    ) -> Prepassed {
        let (c_re, c_im) = (_mm256_set1_pd(cr), _mm256_set1_pd(ci));
        let (above, below) = (_mm256_set1_pd(4.0 + BAND), _mm256_set1_pd(4.0 - BAND));
        let mut z_im = [z_im; 2];
        // All bits set in a lane that is still iterating.
        let all = _mm256_cmp_pd::<_CMP_GT_OQ>(_mm256_set1_pd(1.0), _mm256_setzero_pd());
        let mut active = [all; 2];
        let mut escaped_at = [_mm256_set1_pd(-1.0); 2];
        let mut still = 0;
        for step in 0..steps {
            let now = _mm256_set1_pd(f64::from(step));
            still = 0;
            unrolled!(k in [0, 1] {
                let rr = _mm256_mul_pd(z_re[k], z_re[k]);
                let ii = _mm256_mul_pd(z_im[k], z_im[k]);
                let squared = _mm256_add_pd(rr, ii);
                let mut escaped = _mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(squared, above), active[k]);
                let near = _mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(squared, below), active[k]);
                let undecided = _mm256_andnot_pd(escaped, near);
                if _mm256_movemask_pd(undecided) != 0 {
                    escaped = decide_band(z_re[k], z_im[k], escaped, undecided);
                }
                escaped_at[k] = _mm256_blendv_pd(escaped_at[k], now, escaped);
                active[k] = _mm256_andnot_pd(escaped, active[k]);
                still |= _mm256_movemask_pd(active[k]);
                let ri = _mm256_mul_pd(z_re[k], z_im[k]);
                z_re[k] = _mm256_add_pd(_mm256_sub_pd(rr, ii), c_re);
                z_im[k] = _mm256_add_pd(_mm256_add_pd(ri, ri), c_im);
            });
            if still == 0 {
                break;
            }
        }
        let mut lanes = Prepassed {
            all_escaped: still == 0,
            escaped_at: [0.0; PAIR],
            re: [0.0; PAIR],
            im: [0.0; PAIR],
        };
        // SAFETY: each store writes 4 f64 into half of an 8-element array.
        unsafe {
            unrolled!(k in [0, 1] {
                _mm256_storeu_pd(lanes.escaped_at.as_mut_ptr().add(k * LANES), escaped_at[k]);
                _mm256_storeu_pd(lanes.re.as_mut_ptr().add(k * LANES), z_re[k]);
                _mm256_storeu_pd(lanes.im.as_mut_ptr().add(k * LANES), z_im[k]);
            });
        }
        lanes
    }

    /// Lanes whose `|z|^2` is within the band around 4: the scalar rule decides them.
    #[cold]
    #[target_feature(enable = "avx2")]
    fn decide_band(re: __m256d, im: __m256d, escaped: __m256d, undecided: __m256d) -> __m256d {
        let (mut re_lanes, mut im_lanes, mut mask) =
            ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
        // SAFETY: each store writes 4 f64 into a 4-element array, the load reads one back.
        unsafe {
            _mm256_storeu_pd(re_lanes.as_mut_ptr(), re);
            _mm256_storeu_pd(im_lanes.as_mut_ptr(), im);
            _mm256_storeu_pd(mask.as_mut_ptr(), escaped);
        }
        let undecided = _mm256_movemask_pd(undecided);
        for lane in 0..LANES {
            if undecided & (1 << lane) != 0 && magnitude_exceeds_two(re_lanes[lane], im_lanes[lane])
            {
                mask[lane] = f64::from_bits(u64::MAX);
            }
        }
        // SAFETY: reads 4 f64 from a 4-element array.
        unsafe { _mm256_loadu_pd(mask.as_ptr()) }
    }

    /// Pixels that outlasted the pre-pass: where they are, and their `z` at that step.
    struct Survivors {
        pixel: [usize; SURVIVORS],
        re: [f64; SURVIVORS],
        im: [f64; SURVIVORS],
        len: usize,
    }

    impl Survivors {
        fn new() -> Self {
            Survivors {
                pixel: [0; SURVIVORS],
                re: [0.0; SURVIVORS],
                im: [0.0; SURVIVORS],
                len: 0,
            }
        }

        fn push(&mut self, pixel: usize, re: f64, im: f64) {
            self.pixel[self.len] = pixel;
            self.re[self.len] = re;
            self.im[self.len] = im;
            self.len += 1;
        }
    }

    /// Iterates the survivors of the pre-pass from step `done` to the end.
    ///
    /// Each of four registers (slots) iterates a group of four survivors; when all of a
    /// slot's pixels are finished it takes the next group, so a slow pixel holds up only
    /// three others. The registers are only ever indexed by constants, so they stay in
    /// registers.
    #[target_feature(enable = "avx2")]
    fn iterate_survivors(
        survivors: &Survivors,
        cr: f64,
        ci: f64,
        done: u32,
        iterations: u32,
        out: &mut [u8],
    ) -> u64 {
        // A lane whose |z|^2 passes this may have escaped; the scalar rule decides.
        let near_four = _mm256_set1_pd(4.0 - BAND);
        let (c_re, c_im) = (_mm256_set1_pd(cr), _mm256_set1_pd(ci));
        let mut groups = Groups { survivors, next: 0 };
        let mut z_re = [_mm256_setzero_pd(); SLOTS];
        let mut z_im = [_mm256_setzero_pd(); SLOTS];
        let mut slots = [Slot::IDLE; SLOTS];
        unrolled!(k in [0, 1, 2, 3] {
            if let Some((slot, re, im)) = groups.take(0) {
                (slots[k], z_re[k], z_im[k]) = (slot, re, im);
            }
        });
        // Steps still to go for a survivor.
        let remaining = u64::from(iterations - done);
        let mut next_deadline = deadline(&slots, remaining);
        let mut work = 0;
        // The step every slot counts from: a slot's pixels are at step `done + step - slot.start`.
        let mut step: u64 = 0;
        while next_deadline != IDLE {
            let mut finished = 0u32;
            unrolled!(k in [0, 1, 2, 3] {
                let rr = _mm256_mul_pd(z_re[k], z_re[k]);
                let ii = _mm256_mul_pd(z_im[k], z_im[k]);
                let squared = _mm256_add_pd(rr, ii);
                let near = (_mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(squared, near_four)) as u32) & slots[k].active;
                if near != 0 && slots[k].decide_escapes(z_re[k], z_im[k], near, done + (step - slots[k].start) as u32) {
                    finished |= 1 << k;
                }
                // z*z + c exactly as the scalar kernel: re*im + im*re is ri + ri, bit for bit.
                let ri = _mm256_mul_pd(z_re[k], z_im[k]);
                z_re[k] = _mm256_add_pd(_mm256_sub_pd(rr, ii), c_re);
                z_im[k] = _mm256_add_pd(_mm256_add_pd(ri, ri), c_im);
            });
            step += 1;
            if step == next_deadline {
                // Slots whose pixels have made every update without escaping.
                for (k, slot) in slots.iter().enumerate() {
                    if slot.start != IDLE && slot.start + remaining == step {
                        finished |= 1 << k;
                    }
                }
            }
            if finished != 0 {
                unrolled!(k in [0, 1, 2, 3] {
                    if finished & (1 << k) != 0 {
                        work += slots[k].finish(iterations, out);
                        slots[k] = Slot::IDLE;
                        if let Some((slot, re, im)) = groups.take(step) {
                            (slots[k], z_re[k], z_im[k]) = (slot, re, im);
                        }
                    }
                });
                next_deadline = deadline(&slots, remaining);
            }
        }
        work
    }

    /// The step at which the earliest busy slot runs out of iterations, or `IDLE`.
    fn deadline(slots: &[Slot; SLOTS], iterations: u64) -> u64 {
        slots
            .iter()
            .filter(|s| s.start != IDLE)
            .map(|s| s.start + iterations)
            .min()
            .unwrap_or(IDLE)
    }

    /// The survivors, handed out four at a time.
    struct Groups<'a> {
        survivors: &'a Survivors,
        next: usize,
    }

    impl Groups<'_> {
        /// The next group as a slot starting at `step`, with its `z`.
        #[target_feature(enable = "avx2")]
        fn take(&mut self, step: u64) -> Option<(Slot, __m256d, __m256d)> {
            let first = self.next;
            let total = self.survivors.len;
            if first >= total {
                return None;
            }
            let count = (total - first).min(LANES);
            self.next += count;
            // Spare lanes of a short group repeat its last pixel; they are never active.
            let last = first + count - 1;
            let (mut re, mut im) = (
                [self.survivors.re[last]; LANES],
                [self.survivors.im[last]; LANES],
            );
            let mut pixel = [self.survivors.pixel[last]; LANES];
            re[..count].copy_from_slice(&self.survivors.re[first..first + count]);
            im[..count].copy_from_slice(&self.survivors.im[first..first + count]);
            pixel[..count].copy_from_slice(&self.survivors.pixel[first..first + count]);
            let slot = Slot {
                pixel,
                pixels: count,
                active: (1 << count) - 1,
                start: step,
                escaped_at: [0; LANES],
            };
            // SAFETY: each load reads 4 f64 from a 4-element array.
            Some((slot, unsafe { _mm256_loadu_pd(re.as_ptr()) }, unsafe {
                _mm256_loadu_pd(im.as_ptr())
            }))
        }
    }

    /// Bookkeeping of one register's group of pixels.
    #[derive(Clone, Copy)]
    struct Slot {
        /// Where each lane's pixel is in the row.
        pixel: [usize; LANES],
        /// Lanes that carry a pixel (the last group may be short).
        pixels: usize,
        /// Lanes still iterating, one bit each.
        active: u32,
        /// The step the group started at, or `IDLE`.
        start: u64,
        /// Escape steps of lanes that have escaped.
        escaped_at: [u32; LANES],
    }

    impl Slot {
        const IDLE: Slot = Slot {
            pixel: [0; LANES],
            pixels: 0,
            active: 0,
            start: IDLE,
            escaped_at: [0; LANES],
        };

        /// Decides exactly, lane by lane, whether the `near` lanes have escaped at `step`.
        /// Returns true when no lane of the group is left iterating.
        #[cold]
        #[target_feature(enable = "avx2")]
        fn decide_escapes(&mut self, re: __m256d, im: __m256d, near: u32, step: u32) -> bool {
            let (mut re_lanes, mut im_lanes) = ([0.0f64; LANES], [0.0f64; LANES]);
            // SAFETY: each store writes 4 f64 into a 4-element array.
            unsafe {
                _mm256_storeu_pd(re_lanes.as_mut_ptr(), re);
                _mm256_storeu_pd(im_lanes.as_mut_ptr(), im);
            }
            let mut lanes = near;
            while lanes != 0 {
                let lane = lanes.trailing_zeros() as usize;
                lanes &= lanes - 1;
                if magnitude_exceeds_two(re_lanes[lane], im_lanes[lane]) {
                    self.escaped_at[lane] = step;
                    self.active &= !(1 << lane);
                }
            }
            self.active == 0
        }

        /// Writes the group's pixels and returns its `z` updates.
        fn finish(&self, iterations: u32, out: &mut [u8]) -> u64 {
            let mut work = 0;
            for lane in 0..self.pixels {
                let (step, updates) = if self.active & (1 << lane) != 0 {
                    (iterations - 1, iterations)
                } else {
                    (self.escaped_at[lane], self.escaped_at[lane])
                };
                out[self.pixel[lane]] = palette_index(step);
                work += u64::from(updates);
            }
            work
        }
    }
}
