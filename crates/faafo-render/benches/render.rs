//! Criterion benches of the kernels and the encoder. `faafo bench render` prints the
//! figures the issue asks for; these are for comparing changes to the code.

use std::hint::black_box;
use std::sync::atomic::AtomicBool;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use faafo_render::{Engine, JuliaParams, Kernel, column_coordinates, render_png, render_rows};

fn heavy(width: u32) -> JuliaParams {
    JuliaParams {
        width,
        height: width,
        iterations: 512,
        xa: -1.6,
        xb: 1.6,
        ya: -1.2,
        yb: 1.2,
        cx: -0.8,
        cy: 0.156,
    }
}

fn typical(width: u32) -> JuliaParams {
    // A window and c from the original client's ranges; about 4 iterations per pixel.
    JuliaParams {
        width,
        height: width,
        iterations: 300,
        xa: -2.7,
        xb: 2.4,
        ya: -1.9,
        yb: 1.7,
        cx: -0.7269,
        cy: 0.1889,
    }
}

fn kernels() -> Vec<(&'static str, Kernel)> {
    let mut kernels = vec![("scalar", Kernel::Scalar)];
    if let Ok(simd) = Engine::Simd.kernel() {
        kernels.push(("simd", simd));
    }
    kernels
}

fn kernel(c: &mut Criterion) {
    let mut group = c.benchmark_group("kernel");
    for (case, params) in [("heavy", heavy(256)), ("typical", typical(512))] {
        let columns = column_coordinates(&params);
        let mut pixels = vec![0u8; (params.width * params.height) as usize];
        group.throughput(Throughput::Elements(
            u64::from(params.width) * u64::from(params.height),
        ));
        for (name, kernel) in kernels() {
            group.bench_function(BenchmarkId::new(case, name), |b| {
                b.iter(|| black_box(render_rows(&params, kernel, &columns, 0, &mut pixels)))
            });
        }
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    // One iteration: nearly all of the time is the PNG encoder.
    let params = JuliaParams {
        iterations: 1,
        ..typical(1024)
    };
    let never = AtomicBool::new(false);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1024 * 1024));
    group.bench_function("1-megapixel", |b| {
        b.iter(|| {
            black_box(
                render_png(&params, Engine::Scalar, &never)
                    .unwrap()
                    .bytes
                    .len(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, kernel, encode);
criterion_main!(benches);
