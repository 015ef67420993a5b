//! Vector kernels. Each lane performs exactly the scalar kernel's operations, in the same
//! order and without fused multiply-add, so pixels are bit-identical to the scalar path.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::{
        __m256d, __m256i, _CMP_GT_OQ, _CMP_NLE_UQ, _mm_cvtsi128_si32, _mm_setr_epi8,
        _mm_shuffle_epi8, _mm256_add_epi64, _mm256_add_pd, _mm256_and_si256, _mm256_andnot_pd,
        _mm256_castpd_ps, _mm256_castpd_si256, _mm256_castps_pd, _mm256_castsi256_pd,
        _mm256_castsi256_si128, _mm256_cmp_pd, _mm256_cmpeq_epi64, _mm256_loadu_pd,
        _mm256_loadu_si256, _mm256_max_epu32, _mm256_max_pd, _mm256_movemask_pd, _mm256_mul_pd,
        _mm256_or_pd, _mm256_or_si256, _mm256_permutevar8x32_epi32, _mm256_permutevar8x32_ps,
        _mm256_set1_epi64x, _mm256_set1_pd, _mm256_setr_epi32, _mm256_setr_epi64x,
        _mm256_setzero_pd, _mm256_setzero_si256, _mm256_slli_epi64, _mm256_storeu_pd,
        _mm256_storeu_si256, _mm256_sub_epi64, _mm256_sub_pd,
    };
    use std::cell::RefCell;
    use std::ops::Range;

    use crate::kernel::{BAND, escape_from, palette_index, step_and_updates};

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

    /// Makes the four values (places of `__m256d`) computed before this point and read
    /// after it. Between the steps of two registers, it keeps LLVM's scheduler from
    /// moving every register's last additions to the end of the step, which kept all
    /// their inputs alive at once, ran out of registers and spilled a `z` (the
    /// processor reorders the steps anyway).
    macro_rules! in_order {
        ($($value:expr),*) => {
            // SAFETY: an empty instruction sequence that leaves the registers as they
            // are and touches no memory, stack or flags. Not `pure`, so that LLVM keeps
            // these in program order.
            unsafe {
                std::arch::asm!(
                    "/* {} {} {} {} */",
                    $(inout(ymm_reg) $value),*,
                    options(nomem, nostack, preserves_flags)
                );
            }
        };
    }

    /// f64 lanes in one AVX2 register.
    const LANES: usize = 4;
    /// Registers iterated together: one step is a chain of about 9 cycles of latency
    /// (multiply, subtract, add), so four independent chains keep the units busy.
    const SLOTS: usize = 4;
    /// Pixels iterated together.
    const BLOCK: usize = SLOTS * LANES;

    /// Steps of the first round, which every pixel within |z| = 2 takes straight from
    /// its coordinates: most pixels of a typical image escape at step 0 or 1.
    const FIRST_ROUND: u32 = 2;

    /// Steps of a round that starts at `step`. A lane that escapes during a round idles
    /// until the round ends, so rounds are short while many pixels escape and grow as
    /// the pixels left live longer; each round also costs a pass over the queue.
    fn round_steps(step: u32) -> u32 {
        match step {
            0..8 => 4,
            8..32 => 16,
            _ => 32,
        }
    }

    /// The output index of a lane that holds no pixel: past any output, even shifted
    /// into an ended record.
    const NO_PIXEL: u64 = u64::MAX >> 8;

    /// Renders the rows whose imaginary parts are `ims`, one after another in `out`, each
    /// `columns.len()` pixels wide, and returns the `z` updates the original algorithm
    /// performs for them.
    ///
    /// Pixels go through rounds of a few steps, sixteen lanes at a time. Within a round
    /// nothing branches on a pixel: every lane takes every step, counting the steps at
    /// which it is outside |z| = 2, so that its escape step is known when the round ends.
    /// The pixels still iterating then are packed into a queue for the next round, and
    /// the others are written out. A lane that comes within a hair of |z| = 2 sends its
    /// block to the scalar rule.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn render_rows(
        columns: &[f64],
        ims: &[f64],
        cr: f64,
        ci: f64,
        iterations: u32,
        out: &mut [u8],
    ) -> u64 {
        assert_eq!(out.len(), columns.len() * ims.len(), "output is whole rows");
        let c = Constant { re: cr, im: ci };
        // At most QUEUE_PIXELS pixels at a time (whole rows, one at least), so that the
        // queue stays small whatever a caller asks for at once.
        let rows_at_once = (QUEUE_PIXELS / columns.len().max(1)).max(1);
        let chunks = out.chunks_mut((rows_at_once * columns.len()).max(1));
        QUEUE.with_borrow_mut(|queue| {
            let mut work = 0;
            for (out, ims) in chunks.zip(ims.chunks(rows_at_once)) {
                let rows = Rows {
                    columns,
                    ims,
                    c,
                    iterations,
                };
                work += if c.keeps_escaped_outside() {
                    rows.render::<false>(queue, out)
                } else {
                    rows.render::<true>(queue, out)
                };
            }
            work
        })
    }

    thread_local! {
        /// Each thread's queue, kept between calls: a piece of an image renders in a few
        /// hundred microseconds, and fresh memory touched anew each time would cost a
        /// tenth of that.
        static QUEUE: RefCell<Queue> = RefCell::new(Queue::default());
    }

    /// The most pixels rendered together (a queue holds 32 bytes for each): the pieces
    /// `encode` renders, 16k pixels, fit.
    const QUEUE_PIXELS: usize = 1 << 16;

    /// The rows to render, with the fractal's constant and iteration count.
    struct Rows<'a> {
        columns: &'a [f64],
        ims: &'a [f64],
        c: Constant,
        iterations: u32,
    }

    impl Rows<'_> {
        /// Renders the rows into `out`; returns the `z` updates made. `POISON`: see
        /// [`Block::run`].
        #[target_feature(enable = "avx2")]
        fn render<const POISON: bool>(&self, queue: &mut Queue, out: &mut [u8]) -> u64 {
            let (columns, iterations) = (self.columns, self.iterations);
            queue.clear(out.len());
            let round = |step, steps| Round {
                c: self.c,
                step,
                steps,
                iterations,
            };
            let first = round(0, FIRST_ROUND.min(iterations));
            let mut work = Work::default();
            for (index, (row, &im)) in out
                .chunks_exact_mut(columns.len())
                .zip(self.ims)
                .enumerate()
            {
                let inside = self.within_two(im);
                row[..inside.start].fill(palette_index(0));
                row[inside.end..].fill(palette_index(0));
                let pixels = Pixels {
                    re: &columns[inside.clone()],
                    im,
                    first: index * columns.len() + inside.start,
                };
                first.first::<POISON>(&pixels, &mut row[inside], queue, &mut work);
            }
            let mut total = work.total(first.steps);
            let mut step = first.steps;
            while queue.len > 0 && step < iterations {
                let steps = round_steps(step).min(iterations - step);
                total += round(step, steps).queued::<POISON>(queue, out);
                step += steps;
            }
            total
        }

        /// The columns of the row at `im` whose pixels may be within |z| = 2 at step 0:
        /// all others escape there, with no update, by the scalar rule's first test.
        /// Column coordinates are monotonic, so |z|^2 falls and then rises along the row
        /// (as computed too: every operation rounds monotonically), and those columns
        /// are one range, found by bisection.
        fn within_two(&self, im: f64) -> Range<usize> {
            let columns = self.columns;
            let outside = |re: f64| re * re + im * im > 4.0 + BAND;
            let rising = columns.first() <= columns.last();
            // Where |z| stops falling: the first column at or past re = 0.
            let turn = columns.partition_point(|&re| if rising { re < 0.0 } else { re > 0.0 });
            let start = columns[..turn].partition_point(|&re| outside(re));
            let end = turn + columns[turn..].partition_point(|&re| !outside(re));
            start..end
        }
    }

    /// Consecutive pixels of one row: their real coordinates, the row's imaginary one,
    /// and the first one's index in the output.
    struct Pixels<'a> {
        re: &'a [f64],
        im: f64,
        first: usize,
    }

    /// The pixels still iterating, in columns: `z` and the pixel's index in the output.
    /// Each column has room for every pixel of a call, a block of padding and the spill
    /// of a packed register.
    #[derive(Default)]
    struct Queue {
        re: Vec<f64>,
        im: Vec<f64>,
        pixel: Vec<u64>,
        len: usize,
        /// The pixels a round ended: each its index in the output shifted left by 8 and
        /// its palette index in the low byte, written out once the round is over.
        ended: Vec<u64>,
    }

    impl Queue {
        /// Empties the queue and makes room for `pixels` pixels.
        fn clear(&mut self, pixels: usize) {
            let room = pixels + BLOCK + LANES;
            for column in [&mut self.re, &mut self.im] {
                if column.len() < room {
                    column.resize(room, f64::NAN);
                }
            }
            for column in [&mut self.pixel, &mut self.ended] {
                if column.len() < room {
                    column.resize(room, NO_PIXEL);
                }
            }
            self.len = 0;
        }

        /// Appends the lanes of `keep` (one bit each) with their `z` and pixels.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn push(&mut self, re: __m256d, im: __m256d, pixel: __m256i, keep: u32) {
            // SAFETY: `clear` made room for every pixel of the call, and each is pushed
            // once.
            unsafe { self.columns().store(self.len, re, im, pixel, keep) };
            self.len += keep.count_ones() as usize;
        }

        /// Pads the queue with lanes of no pixel up to a whole number of blocks, and
        /// returns that number of lanes. A lane of no pixel holds NaN, which escapes at
        /// once and so is never kept, and it counts no `z` update.
        fn pad_to_blocks(&mut self) -> usize {
            let padded = self.len.next_multiple_of(BLOCK);
            self.re[self.len..padded].fill(f64::NAN);
            self.im[self.len..padded].fill(f64::NAN);
            self.pixel[self.len..padded].fill(NO_PIXEL);
            padded
        }

        fn columns(&mut self) -> Columns {
            Columns {
                re: self.re.as_mut_ptr(),
                im: self.im.as_mut_ptr(),
                pixel: self.pixel.as_mut_ptr(),
                ended: self.ended.as_mut_ptr(),
            }
        }
    }

    /// The queue's columns during a round, which reads each block and then packs what
    /// goes on into the same columns, at or before the block: raw pointers, as slices
    /// would check every access (a fifth of a round's instructions).
    #[derive(Clone, Copy)]
    struct Columns {
        re: *mut f64,
        im: *mut f64,
        pixel: *mut u64,
        ended: *mut u64,
    }

    impl Columns {
        /// Reads the block at `at`.
        ///
        /// # Safety
        /// `at + BLOCK` must be within the columns.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn block(self, at: usize) -> (Block, [__m256i; SLOTS]) {
            // SAFETY: the caller's promise: each load reads 4 elements within the block.
            unsafe {
                let block = Block {
                    re: std::array::from_fn(|k| _mm256_loadu_pd(self.re.add(at + k * LANES))),
                    im: std::array::from_fn(|k| _mm256_loadu_pd(self.im.add(at + k * LANES))),
                };
                let pixels = std::array::from_fn(|k| {
                    _mm256_loadu_si256(self.pixel.add(at + k * LANES).cast())
                });
                (block, pixels)
            }
        }

        /// Writes the lanes of `keep` (one bit each) at `at`, in order, and garbage after
        /// them up to `at + 4`.
        ///
        /// # Safety
        /// `at + 4` must be within the columns.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn store(self, at: usize, re: __m256d, im: __m256d, pixel: __m256i, keep: u32) {
            let order = pack_order(keep);
            let pack = |lanes: __m256d| {
                _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(lanes), order))
            };
            // SAFETY: the caller's promise: each store writes 4 elements from `at`.
            unsafe {
                _mm256_storeu_pd(self.re.add(at), pack(re));
                _mm256_storeu_pd(self.im.add(at), pack(im));
                _mm256_storeu_si256(
                    self.pixel.add(at).cast(),
                    _mm256_permutevar8x32_epi32(pixel, order),
                );
            }
        }

        /// Writes the records of the lanes of `keep` at `at` of the ended pixels, as
        /// [`Columns::store`] does.
        ///
        /// # Safety
        /// `at + 4` must be within the columns.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn store_ended(self, at: usize, records: __m256i, keep: u32) {
            let packed = _mm256_permutevar8x32_epi32(records, pack_order(keep));
            // SAFETY: the caller's promise: writes 4 elements from `at`.
            unsafe { _mm256_storeu_si256(self.ended.add(at).cast(), packed) };
        }
    }

    /// The permutation of 32-bit halves that moves the 64-bit lanes of `keep` (one bit
    /// each) to the front, in order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn pack_order(keep: u32) -> __m256i {
        const ORDERS: [[i32; 8]; 16] = {
            let mut table = [[0; 8]; 16];
            let mut keep = 0;
            while keep < 16 {
                let (mut to, mut lane) = (0, 0);
                while lane < LANES {
                    if keep & (1 << lane) != 0 {
                        table[keep][2 * to] = 2 * lane as i32;
                        table[keep][2 * to + 1] = 2 * lane as i32 + 1;
                        to += 1;
                    }
                    lane += 1;
                }
                keep += 1;
            }
            table
        };
        // SAFETY: reads 8 i32 from an 8-element row of the table.
        unsafe { _mm256_loadu_si256(ORDERS[keep as usize & 0xF].as_ptr().cast()) }
    }

    /// `c`.
    #[derive(Clone, Copy)]
    struct Constant {
        re: f64,
        im: f64,
    }

    impl Constant {
        /// Whether a `z` past |z| = 2 stays past it under `z -> z*z + c`: when |c| <= 1.97,
        /// |z*z + c| >= |z|^2 - |c| > 4 - 1.97, with a margin that rounding cannot
        /// cross, and |z| only grows (or becomes infinite, then NaN, both outside).
        fn keeps_escaped_outside(&self) -> bool {
            self.re * self.re + self.im * self.im <= 1.97 * 1.97
        }
    }

    /// `z` of a block's sixteen lanes.
    #[derive(Clone, Copy)]
    struct Block {
        re: [__m256d; SLOTS],
        im: [__m256d; SLOTS],
    }

    /// What a round's steps left in a block.
    struct Counted {
        /// Per lane, the steps at which it was outside |z| = 2: 0 for a lane still
        /// iterating, else the steps from its escape to the round's end.
        outside: [__m256i; SLOTS],
        /// Whether some lane came within [`BAND`] of |z|^2 = 4 while inside, where only
        /// the exact rule decides.
        near: bool,
    }

    impl Block {
        /// Takes `steps` steps on every lane, counting for each the steps at which it is
        /// outside |z| = 2. A lane's count is its steps since its escape only if it stays
        /// outside once it is: with `POISON`, a lane found outside becomes NaN, which
        /// stays outside; without, `c` must be [`Constant::keeps_escaped_outside`] (a
        /// step is an operation shorter).
        #[inline]
        #[target_feature(enable = "avx2")]
        fn run<const POISON: bool>(&mut self, steps: u32, c: Constant) -> Counted {
            let (c_re, c_im) = (_mm256_set1_pd(c.re), _mm256_set1_pd(c.im));
            let above = _mm256_set1_pd(4.0 + BAND);
            let mut outside = [_mm256_setzero_si256(); SLOTS];
            // The largest |z|^2 of a lane while inside: past 4 - BAND only the exact
            // rule decides. (A maximum takes two operations a step, where comparing
            // with 4 - BAND took three and ran a fifth slower.)
            let mut inside_highest = _mm256_setzero_pd();
            for _ in 0..steps {
                unrolled!(k in [0, 1, 2, 3] {
                    let (re, im) = (self.re[k], self.im[k]);
                    let rr = _mm256_mul_pd(re, re);
                    let ii = _mm256_mul_pd(im, im);
                    let ri = _mm256_mul_pd(re, im);
                    // The scalar kernel's |z|^2, bit for bit; NaN counts as outside.
                    let squared = _mm256_add_pd(rr, ii);
                    let out = _mm256_cmp_pd::<_CMP_NLE_UQ>(squared, above);
                    inside_highest =
                        _mm256_max_pd(_mm256_andnot_pd(out, squared), inside_highest);
                    // Subtracting -1 counts a step for each lane outside.
                    outside[k] = _mm256_sub_epi64(outside[k], _mm256_castpd_si256(out));
                    let next_re = _mm256_add_pd(_mm256_sub_pd(rr, ii), c_re);
                    self.re[k] = if POISON { _mm256_or_pd(next_re, out) } else { next_re };
                    // re*im + im*re is ri + ri, bit for bit.
                    self.im[k] = _mm256_add_pd(_mm256_add_pd(ri, ri), c_im);
                    let next = (k + 1) % SLOTS;
                    in_order!(self.re[k], self.im[k], self.re[next], self.im[next]);
                });
            }
            let below = _mm256_set1_pd(4.0 - BAND);
            Counted {
                outside,
                near: _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(inside_highest, below)) != 0,
            }
        }
    }

    /// The `z` updates of a round's vector lanes, added up as they go: each lane made one
    /// per step at which it was inside.
    struct Work {
        /// Lanes run (blocks of lanes sent to the scalar rule are not).
        lanes: u64,
        /// Their steps outside, summed lane by lane.
        outside: __m256i,
        /// The updates of pixels finished by the scalar rule.
        exact: u64,
    }

    impl Default for Work {
        fn default() -> Self {
            Work {
                lanes: 0,
                // SAFETY: SSE2, part of x86-64, suffices.
                outside: unsafe { _mm256_setzero_si256() },
                exact: 0,
            }
        }
    }

    impl Work {
        #[inline]
        #[target_feature(enable = "avx2")]
        fn add(&mut self, counted: &Counted) {
            self.lanes += BLOCK as u64;
            unrolled!(k in [0, 1, 2, 3] {
                self.outside = _mm256_add_epi64(self.outside, counted.outside[k]);
            });
        }

        /// The updates made in a round of `steps` steps.
        #[target_feature(enable = "avx2")]
        fn total(&self, steps: u32) -> u64 {
            let mut each = [0u64; LANES];
            // SAFETY: writes 4 u64 into a 4-element array.
            unsafe { _mm256_storeu_si256(each.as_mut_ptr().cast(), self.outside) };
            self.lanes * u64::from(steps) - each.iter().sum::<u64>() + self.exact
        }
    }

    /// One round: `steps` steps from `step`, for pixels that have made `step` updates.
    #[derive(Clone, Copy)]
    struct Round {
        c: Constant,
        step: u32,
        steps: u32,
        iterations: u32,
    }

    /// A register's lanes as a round ends them.
    struct Ended {
        /// The palette index of each lane: of its escape step, or of the last step if it
        /// has not escaped (right only at the last round; any other round writes it
        /// again later).
        colour: __m256i,
        /// The lanes still iterating, one bit each (none after the last round).
        going_on: u32,
    }

    impl Round {
        /// How a register's lanes end this round, from their `outside` counts.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn end(&self, outside: __m256i) -> Ended {
            // A lane that escaped at step s of this round is outside from s on: its
            // escape step is the round's end minus that count. A lane still inside is
            // at the round's end minus one, the last step if this round is the last.
            let end = self.step + self.steps;
            let at_least_one = _mm256_set1_epi64x(1);
            // The counts fit in 32 bits, so the unsigned 32-bit maximum is theirs.
            let step = _mm256_sub_epi64(
                _mm256_set1_epi64x(i64::from(end)),
                _mm256_max_epu32(outside, at_least_one),
            );
            // `step % 32`, as `palette_index` has it.
            let colour = _mm256_and_si256(step, _mm256_set1_epi64x(31));
            let inside = _mm256_cmpeq_epi64(outside, _mm256_setzero_si256());
            let may_go_on = if end == self.iterations { 0 } else { 0xF };
            Ended {
                colour,
                going_on: _mm256_movemask_pd(_mm256_castsi256_pd(inside)) as u32 & may_go_on,
            }
        }

        /// The pixel at step `self.step` with this `z`, finished by the scalar rule: its
        /// palette index and the updates it makes from now on.
        fn exactly(&self, re: f64, im: f64) -> (u8, u64) {
            let escape = escape_from(re, im, self.c.re, self.c.im, self.step, self.iterations);
            let (step, updates) = step_and_updates(escape, self.iterations);
            (palette_index(step), u64::from(updates - self.step))
        }

        /// The first round of consecutive pixels of a row, from their coordinates:
        /// writes their palette indices into `colours` (those going on are written
        /// again when they end) and queues those going on.
        #[target_feature(enable = "avx2")]
        fn first<const POISON: bool>(
            &self,
            pixels: &Pixels,
            colours: &mut [u8],
            queue: &mut Queue,
            work: &mut Work,
        ) {
            let columns = pixels.re;
            for first in (0..columns.len()).step_by(BLOCK) {
                let count = (columns.len() - first).min(BLOCK);
                let block_re: [f64; BLOCK] = match columns[first..].first_chunk() {
                    Some(whole) => *whole,
                    // The row's last pixels: spare lanes hold NaN, which escapes at once.
                    None => std::array::from_fn(|lane| {
                        columns.get(first + lane).copied().unwrap_or(f64::NAN)
                    }),
                };
                // SAFETY: reads 4 f64 at each of 0, 4, 8 and 12 of a 16-element array.
                let mut block = Block {
                    re: std::array::from_fn(|k| unsafe {
                        _mm256_loadu_pd(block_re.as_ptr().add(k * LANES))
                    }),
                    im: [_mm256_set1_pd(pixels.im); SLOTS],
                };
                let counted = block.run::<POISON>(self.steps, self.c);
                let colours = &mut colours[first..first + count];
                if counted.near {
                    for (colour, &re) in colours.iter_mut().zip(&columns[first..]) {
                        let updates;
                        (*colour, updates) = self.exactly(re, pixels.im);
                        work.exact += updates;
                    }
                    continue;
                }
                work.add(&counted);
                let mut block_colours = [0u8; BLOCK];
                unrolled!(k in [0, 1, 2, 3] {
                    let ended = self.end(counted.outside[k]);
                    block_colours[k * LANES..(k + 1) * LANES].copy_from_slice(&low_bytes(ended.colour));
                    let indices = _mm256_add_epi64(
                        _mm256_set1_epi64x((pixels.first + first + k * LANES) as i64),
                        _mm256_setr_epi64x(0, 1, 2, 3),
                    );
                    queue.push(block.re[k], block.im[k], indices, ended.going_on);
                });
                colours.copy_from_slice(&block_colours[..count]);
            }
        }

        /// A round of the queued pixels: writes those that end, and packs the others at
        /// the queue's front for the next round. Returns the `z` updates made.
        #[target_feature(enable = "avx2")]
        fn queued<const POISON: bool>(&self, queue: &mut Queue, out: &mut [u8]) -> u64 {
            let lanes = queue.pad_to_blocks();
            let columns = queue.columns();
            let mut work = Work::default();
            let (mut kept, mut ended) = (0, 0);
            for first in (0..lanes).step_by(BLOCK) {
                // SAFETY: the queue is padded to `lanes`, a whole number of blocks.
                let (mut block, pixels) = unsafe { columns.block(first) };
                let counted = block.run::<POISON>(self.steps, self.c);
                if counted.near {
                    // Packing so far wrote below `first`, so the block's `z` from before
                    // the round is still in the queue.
                    for lane in first..first + BLOCK {
                        if let Some(pixel) = out.get_mut(queue.pixel[lane] as usize) {
                            let updates;
                            (*pixel, updates) = self.exactly(queue.re[lane], queue.im[lane]);
                            work.exact += updates;
                        }
                    }
                    continue;
                }
                work.add(&counted);
                unrolled!(k in [0, 1, 2, 3] {
                    let lanes = self.end(counted.outside[k]);
                    let ending = !lanes.going_on & 0xF;
                    let records = _mm256_or_si256(_mm256_slli_epi64::<8>(pixels[k]), lanes.colour);
                    // SAFETY: `kept` and `ended` are at most this register's place in the
                    // queue, whose lanes are read already, and the columns have room
                    // for a register past the padded queue.
                    unsafe {
                        columns.store(kept, block.re[k], block.im[k], pixels[k], lanes.going_on);
                        columns.store_ended(ended, records, ending);
                    }
                    kept += lanes.going_on.count_ones() as usize;
                    ended += ending.count_ones() as usize;
                });
            }
            queue.len = kept;
            for &record in &queue.ended[..ended] {
                if let Some(pixel) = out.get_mut((record >> 8) as usize) {
                    *pixel = record as u8;
                }
            }
            work.total(self.steps)
        }
    }

    /// The palette index of each lane, as bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn low_bytes(colour: __m256i) -> [u8; LANES] {
        let low_halves =
            _mm256_permutevar8x32_epi32(colour, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0));
        let bytes = _mm_shuffle_epi8(
            _mm256_castsi256_si128(low_halves),
            _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
        );
        _mm_cvtsi128_si32(bytes).to_le_bytes()
    }
}
