//! Vector kernels. Each lane performs exactly the scalar kernel's operations, in the same
//! order and without fused multiply-add, so pixels are bit-identical to the scalar path.
//! (A fused multiply-add only filters which lanes to look at; it never decides a pixel.)

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::{
        __m256d, _CMP_GT_OQ, _mm256_add_pd, _mm256_andnot_pd, _mm256_blendv_pd,
        _mm256_castpd_si256, _mm256_castsi256_pd, _mm256_cmp_pd, _mm256_cmpeq_epi64,
        _mm256_fmadd_pd, _mm256_loadu_pd, _mm256_loadu_si256, _mm256_movemask_pd, _mm256_mul_pd,
        _mm256_or_pd, _mm256_set1_epi64x, _mm256_set1_pd, _mm256_setzero_pd, _mm256_setzero_si256,
        _mm256_storeu_pd, _mm256_storeu_si256, _mm256_sub_epi64, _mm256_sub_pd,
    };

    use crate::kernel::{BAND, advance, magnitude_exceeds_two, palette_index};

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
    /// The start of a lane that has no pixel.
    const IDLE: u64 = u64::MAX;

    /// Steps every pixel takes in the vector pre-pass before the survivor loop takes over.
    /// The pre-pass wastes the lanes of pixels that escaped before their group's last, but
    /// spends nothing per escape; measured on the typical mix and the heavy case, 24 to 48
    /// steps did best (8 was 15% slower).
    const PREPASS_STEPS: u32 = 24;

    /// Renders the rows whose imaginary parts are `ims`, one after another in `out`, each
    /// `columns.len()` pixels wide, and returns the `z` updates the original algorithm
    /// performs for them.
    ///
    /// Most pixels of a typical image escape within a few steps, so every group of eight
    /// pixels first runs up to `PREPASS_STEPS` steps in a short vector loop. The pixels
    /// still iterating after that are gathered over all the rows and go on in
    /// [`iterate_survivors`], whose lanes run dry only once, at the end.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn render_rows(
        columns: &[f64],
        ims: &[f64],
        cr: f64,
        ci: f64,
        iterations: u32,
        out: &mut [u8],
    ) -> u64 {
        let width = columns.len();
        debug_assert_eq!(out.len(), width * ims.len());
        let prepass = iterations.min(PREPASS_STEPS);
        let pass = Prepass {
            c: (cr, ci),
            steps: prepass,
            iterations,
        };
        let mut survivors = Vec::new();
        let mut work = 0;
        for (index, (row, &im)) in out.chunks_exact_mut(width).zip(ims).enumerate() {
            work += pass.row(columns, im, row, index * width, &mut survivors);
        }
        if !survivors.is_empty() {
            work += iterate_survivors(&survivors, cr, ci, prepass, iterations, out);
        }
        work
    }

    /// The pre-pass of one image.
    struct Prepass {
        c: (f64, f64),
        steps: u32,
        iterations: u32,
    }

    impl Prepass {
        /// Runs the pre-pass over one row (its pixels start at `first_pixel` of the
        /// output), writing the pixels it decides into `out` and pushing the others onto
        /// `survivors`. Returns the `z` updates of the pixels it decided.
        #[target_feature(enable = "avx2")]
        fn row(
            &self,
            columns: &[f64],
            im: f64,
            out: &mut [u8],
            first_pixel: usize,
            survivors: &mut Vec<Survivor>,
        ) -> u64 {
            let (cr, ci) = self.c;
            let mut work = 0;
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
                let outcome = prepass_pair(z_re, im, cr, ci, self.steps);
                if outcome.still == 0 && pixels == PAIR {
                    // The common case, without a branch per pixel.
                    for (pixel, &step) in out[first..first + PAIR].iter_mut().zip(&outcome.steps) {
                        *pixel = palette_index(step as u32);
                    }
                    work += outcome.steps.iter().sum::<u64>();
                    first += PAIR;
                    continue;
                }
                for lane in 0..pixels {
                    let pixel = first + lane;
                    if outcome.still & (1 << lane) == 0 {
                        let step = outcome.steps[lane];
                        out[pixel] = palette_index(step as u32);
                        work += step;
                    } else if self.iterations == self.steps {
                        out[pixel] = palette_index(self.iterations - 1);
                        work += u64::from(self.iterations);
                    } else {
                        survivors.push(Survivor {
                            pixel: first_pixel + pixel,
                            re: outcome.re[lane],
                            im: outcome.im[lane],
                        });
                    }
                }
                first += pixels;
            }
            work
        }
    }

    /// Pixels the pre-pass iterates together: two registers, two independent chains.
    const PAIR: usize = 2 * LANES;

    /// What the pre-pass left of eight pixels.
    struct Prepassed {
        /// The lanes still iterating, one bit each.
        still: u32,
        /// The escape step of each lane that escaped (the `z` updates it made).
        steps: [u64; PAIR],
        /// `z` of the lanes still iterating.
        re: [f64; PAIR],
        im: [f64; PAIR],
    }

    /// Runs up to `steps` steps on eight pixels of a row. Each lane counts the steps it
    /// has made without escaping (its escape step, once it has), with vector operations
    /// rather than branches.
    #[target_feature(enable = "avx2")]
    fn prepass_pair(mut z_re: [__m256d; 2], im: f64, cr: f64, ci: f64, steps: u32) -> Prepassed {
        let (c_re, c_im) = (_mm256_set1_pd(cr), _mm256_set1_pd(ci));
        let (above, below) = (_mm256_set1_pd(4.0 + BAND), _mm256_set1_pd(4.0 - BAND));
        let mut z_im = [_mm256_set1_pd(im); 2];
        // All bits set in a lane that is still iterating: -1 as an integer.
        let all = _mm256_cmp_pd::<_CMP_GT_OQ>(_mm256_set1_pd(1.0), _mm256_setzero_pd());
        let mut active = [all; 2];
        let mut count = [_mm256_setzero_si256(); 2];
        let mut still = 0;
        // Lanes that were ever within the band around 4, where only the scalar rule decides.
        // Lanes that escaped keep iterating and are not masked out of this: past 2, |z|
        // grows (or becomes NaN, which compares false), so they hardly ever land in the
        // band again, and if one did, the exact path would only redo the eight pixels.
        let mut undecided = _mm256_setzero_pd();
        let start = z_re;
        for _ in 0..steps {
            still = 0;
            unrolled!(k in [0, 1] {
                let rr = _mm256_mul_pd(z_re[k], z_re[k]);
                let ii = _mm256_mul_pd(z_im[k], z_im[k]);
                let squared = _mm256_add_pd(rr, ii);
                let escaped = _mm256_cmp_pd::<_CMP_GT_OQ>(squared, above);
                let near = _mm256_cmp_pd::<_CMP_GT_OQ>(squared, below);
                undecided = _mm256_or_pd(undecided, _mm256_andnot_pd(escaped, near));
                active[k] = _mm256_andnot_pd(escaped, active[k]);
                // Subtracting -1 counts a step for each lane still going.
                count[k] = _mm256_sub_epi64(count[k], _mm256_castpd_si256(active[k]));
                still |= _mm256_movemask_pd(active[k]) << (k * LANES);
                let ri = _mm256_mul_pd(z_re[k], z_im[k]);
                z_re[k] = _mm256_add_pd(_mm256_sub_pd(rr, ii), c_re);
                z_im[k] = _mm256_add_pd(_mm256_add_pd(ri, ri), c_im);
            });
            if still == 0 {
                break;
            }
        }
        if _mm256_movemask_pd(undecided) != 0 {
            // A lane came within a hair of |z| = 2 (rare): the scalar rule decides the
            // eight pixels instead.
            return prepass_pair_exactly(start, im, cr, ci, steps);
        }
        let mut lanes = Prepassed {
            still: still as u32,
            steps: [0; PAIR],
            re: [0.0; PAIR],
            im: [0.0; PAIR],
        };
        // SAFETY: each store writes 4 values into half of an 8-element array.
        unsafe {
            unrolled!(k in [0, 1] {
                _mm256_storeu_si256(lanes.steps.as_mut_ptr().add(k * LANES).cast(), count[k]);
                _mm256_storeu_pd(lanes.re.as_mut_ptr().add(k * LANES), z_re[k]);
                _mm256_storeu_pd(lanes.im.as_mut_ptr().add(k * LANES), z_im[k]);
            });
        }
        lanes
    }

    /// What [`prepass_pair`] computes, pixel by pixel with the scalar rule.
    #[cold]
    #[target_feature(enable = "avx2")]
    fn prepass_pair_exactly(
        z_re: [__m256d; 2],
        im: f64,
        cr: f64,
        ci: f64,
        steps: u32,
    ) -> Prepassed {
        let mut lanes = Prepassed {
            still: 0,
            steps: [0; PAIR],
            re: [0.0; PAIR],
            im: [0.0; PAIR],
        };
        // SAFETY: each store writes 4 f64 into half of an 8-element array.
        unsafe {
            _mm256_storeu_pd(lanes.re.as_mut_ptr(), z_re[0]);
            _mm256_storeu_pd(lanes.re.as_mut_ptr().add(LANES), z_re[1]);
        }
        for lane in 0..PAIR {
            let (mut re, mut im) = (lanes.re[lane], im);
            let mut step = 0;
            while step < steps && !magnitude_exceeds_two(re, im) {
                (re, im) = advance(re, im, cr, ci);
                step += 1;
            }
            lanes.steps[lane] = u64::from(step);
            if step == steps {
                lanes.still |= 1 << lane;
            }
            (lanes.re[lane], lanes.im[lane]) = (re, im);
        }
        lanes
    }

    /// A pixel still iterating after the pre-pass: where it is in the output, and its `z`.
    #[derive(Clone, Copy)]
    struct Survivor {
        pixel: usize,
        re: f64,
        im: f64,
    }

    /// Lanes the survivor loop iterates at once.
    const ALL_LANES: usize = SLOTS * LANES;

    /// The index of each lane of each register: lane `l` of register `k` is `k * 4 + l`.
    const LANE_IDS: [[i64; LANES]; SLOTS] = {
        let mut ids = [[0; LANES]; SLOTS];
        let mut index = 0;
        while index < ALL_LANES {
            ids[index / LANES][index % LANES] = index as i64;
            index += 1;
        }
        ids
    };

    /// Iterates the survivors of the pre-pass from step `done` to the end.
    ///
    /// Four registers of four lanes iterate sixteen pixels (four independent chains
    /// hide the latency of an iteration). A lane whose pixel escapes or makes its last
    /// update takes the next survivor at once, so no lane waits for a slower neighbour.
    /// The loop itself only iterates and tests whether any lane may have passed |z| = 2;
    /// everything per pixel happens off it, once per escape. Idle lanes hold NaN, which
    /// never passes.
    #[target_feature(enable = "avx2,fma")]
    fn iterate_survivors(
        survivors: &[Survivor],
        cr: f64,
        ci: f64,
        done: u32,
        iterations: u32,
        out: &mut [u8],
    ) -> u64 {
        let c = (_mm256_set1_pd(cr), _mm256_set1_pd(ci));
        // A lane whose |z|^2 passes 4 - BAND may have escaped; the scalar rule decides.
        let minus_near_four = _mm256_set1_pd(-(4.0 - BAND));
        let mut lanes = Lanes {
            queue: survivors.iter(),
            pixel: [0; ALL_LANES],
            start: [IDLE; ALL_LANES],
            deadline: IDLE,
            done,
            iterations,
            out,
            work: 0,
        };
        let mut z = lanes.fill(Registers::idle(), (1 << ALL_LANES) - 1, 0);
        lanes.deadline = lanes.earliest_deadline();
        // The step every lane counts from: a lane's pixel is at step `done + step - start`.
        let mut step: u64 = 0;
        while lanes.deadline != IDLE {
            // The hot loop: nothing but the arithmetic and one test per step.
            let deadline = lanes.deadline;
            while step != deadline && !z.may_have_escaped(minus_near_four) {
                z = z.advance(c);
                step += 1;
            }
            if step == deadline {
                z = lanes.retire(z, step);
            } else {
                z = lanes.escape(z, c, step);
                step += 1;
            }
        }
        lanes.work
    }

    /// The `z` of the sixteen lanes.
    #[derive(Clone, Copy)]
    struct Registers {
        re: [__m256d; SLOTS],
        im: [__m256d; SLOTS],
    }

    impl Registers {
        #[target_feature(enable = "avx2")]
        fn idle() -> Self {
            let nan = _mm256_set1_pd(f64::NAN);
            Registers {
                re: [nan; SLOTS],
                im: [nan; SLOTS],
            }
        }

        /// Whether any lane's |z|^2 may exceed 4 - BAND: fused multiply-adds, a few ulps
        /// from the exact value and computed apart from the squares of [`advance`], so
        /// none of those stay alive across the branch on this.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn may_have_escaped(&self, minus_near_four: __m256d) -> bool {
            let mut near = _mm256_setzero_pd();
            unrolled!(k in [0, 1, 2, 3] {
                let beyond = _mm256_fmadd_pd(self.re[k], self.re[k], _mm256_fmadd_pd(self.im[k], self.im[k], minus_near_four));
                near = _mm256_or_pd(near, _mm256_cmp_pd::<_CMP_GT_OQ>(beyond, _mm256_setzero_pd()));
            });
            _mm256_movemask_pd(near) != 0
        }

        /// The lanes that have escaped (`|z| > 2` by the scalar rule), one bit each.
        /// `re*re + im*im` is the scalar kernel's `|z|^2` bit for bit, so only lanes
        /// within the band around 4 need the exact test.
        #[target_feature(enable = "avx2")]
        fn escaped(&self) -> u32 {
            let (above, below) = (_mm256_set1_pd(4.0 + BAND), _mm256_set1_pd(4.0 - BAND));
            let (mut escaped, mut undecided) = (0, 0);
            unrolled!(k in [0, 1, 2, 3] {
                let squared = _mm256_add_pd(_mm256_mul_pd(self.re[k], self.re[k]), _mm256_mul_pd(self.im[k], self.im[k]));
                let beyond = _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(squared, above)) as u32;
                let near = _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(squared, below)) as u32;
                escaped |= beyond << (k * LANES);
                undecided |= (near & !beyond) << (k * LANES);
            });
            if undecided != 0 {
                let (re, im) = self.lanes();
                while undecided != 0 {
                    let index = undecided.trailing_zeros() as usize;
                    undecided &= undecided - 1;
                    if magnitude_exceeds_two(re[index], im[index]) {
                        escaped |= 1 << index;
                    }
                }
            }
            escaped
        }

        /// One step of `z -> z*z + c` on every lane, exactly as the scalar kernel:
        /// re*im + im*re is ri + ri, bit for bit.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn advance(self, (c_re, c_im): (__m256d, __m256d)) -> Self {
            let mut next = self;
            unrolled!(k in [0, 1, 2, 3] {
                let rr = _mm256_mul_pd(self.re[k], self.re[k]);
                let ii = _mm256_mul_pd(self.im[k], self.im[k]);
                let ri = _mm256_mul_pd(self.re[k], self.im[k]);
                next.re[k] = _mm256_add_pd(_mm256_sub_pd(rr, ii), c_re);
                next.im[k] = _mm256_add_pd(_mm256_add_pd(ri, ri), c_im);
            });
            next
        }

        /// Every lane's real and imaginary part, lane `k * 4 + l` being lane `l` of
        /// register `k`.
        #[target_feature(enable = "avx2")]
        fn lanes(&self) -> ([f64; ALL_LANES], [f64; ALL_LANES]) {
            let (mut re, mut im) = ([0.0; ALL_LANES], [0.0; ALL_LANES]);
            unrolled!(k in [0, 1, 2, 3] {
                // SAFETY: each store writes 4 f64 inside a 16-element array.
                unsafe {
                    _mm256_storeu_pd(re.as_mut_ptr().add(k * LANES), self.re[k]);
                    _mm256_storeu_pd(im.as_mut_ptr().add(k * LANES), self.im[k]);
                }
            });
            (re, im)
        }
    }

    /// Which pixel each lane carries, the survivors still to come, and the output.
    struct Lanes<'a> {
        queue: std::slice::Iter<'a, Survivor>,
        /// Where each lane's pixel is in the output.
        pixel: [usize; ALL_LANES],
        /// The step each lane's pixel started at, or `IDLE`.
        start: [u64; ALL_LANES],
        /// A step no later than the one at which the oldest busy lane makes its last
        /// update, or `IDLE` once every lane is idle.
        deadline: u64,
        /// The pre-pass steps every survivor has made.
        done: u32,
        iterations: u32,
        out: &'a mut [u8],
        /// `z` updates of the pixels written so far.
        work: u64,
    }

    impl Lanes<'_> {
        /// Some lane may have escaped at `step`: decides exactly which have, writes
        /// their pixels, makes the step, and puts the next survivors into their lanes.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn escape(&mut self, z: Registers, c: (__m256d, __m256d), step: u64) -> Registers {
            let escaped = z.escaped();
            let mut lanes = escaped;
            while lanes != 0 {
                let index = lanes.trailing_zeros() as usize;
                lanes &= lanes - 1;
                let at = self.done + (step - self.start[index]) as u32;
                self.out[self.pixel[index]] = palette_index(at);
                self.work += u64::from(at);
            }
            let next = z.advance(c);
            if escaped == 0 {
                return next;
            }
            self.fill(next, escaped, step + 1)
        }

        /// Writes the pixels of the lanes that make their last update at `step` without
        /// escaping, puts the next survivors into their lanes, and finds the next
        /// deadline.
        #[cold]
        #[inline(never)]
        #[target_feature(enable = "avx2")]
        fn retire(&mut self, z: Registers, step: u64) -> Registers {
            let remaining = u64::from(self.iterations - self.done);
            let mut due = 0;
            for (index, &start) in self.start.iter().enumerate() {
                if start != IDLE && start + remaining == step {
                    self.out[self.pixel[index]] = palette_index(self.iterations - 1);
                    self.work += u64::from(self.iterations);
                    due |= 1 << index;
                }
            }
            let z = self.fill(z, due, step);
            self.deadline = self.earliest_deadline();
            z
        }

        /// Puts the next survivors into the `free` lanes (one bit each), starting at
        /// `step`; lanes left without one become idle, and then the deadline is found
        /// again, as it may have been theirs.
        #[target_feature(enable = "avx2")]
        fn fill(&mut self, mut z: Registers, free: u32, step: u64) -> Registers {
            let mut lanes = free;
            let mut emptied = false;
            while lanes != 0 {
                let index = lanes.trailing_zeros() as usize;
                lanes &= lanes - 1;
                let (re, im) = match self.queue.next() {
                    Some(survivor) => {
                        self.pixel[index] = survivor.pixel;
                        self.start[index] = step;
                        (survivor.re, survivor.im)
                    }
                    None => {
                        self.start[index] = IDLE;
                        emptied = true;
                        (f64::NAN, f64::NAN)
                    }
                };
                let (re, im) = (_mm256_set1_pd(re), _mm256_set1_pd(im));
                let wanted = _mm256_set1_epi64x(index as i64);
                // Every register is blended, the lane's own with a mask of one lane and
                // the others with none: which register it is varies from one escape to
                // the next, and a branch on it was mispredicted about as often.
                // (Registers indexed by constants only, or they would be kept in memory.)
                unrolled!(k in [0, 1, 2, 3] {
                    // SAFETY: reads 4 i64 from a 4-element array.
                    let ids = unsafe { _mm256_loadu_si256(LANE_IDS[k].as_ptr().cast()) };
                    let this_lane = _mm256_castsi256_pd(_mm256_cmpeq_epi64(ids, wanted));
                    z.re[k] = _mm256_blendv_pd(z.re[k], re, this_lane);
                    z.im[k] = _mm256_blendv_pd(z.im[k], im, this_lane);
                });
            }
            if emptied {
                self.deadline = self.earliest_deadline();
            }
            z
        }

        /// The step at which the oldest busy lane makes its last update, or `IDLE`.
        fn earliest_deadline(&self) -> u64 {
            match self.start.iter().min() {
                Some(&start) if start != IDLE => start + u64::from(self.iterations - self.done),
                _ => IDLE,
            }
        }
    }
}
