//! The renderer against the original algorithm run by CPython itself: the decoded PNG
//! must equal the original's raw RGB byte for byte.

use std::process::Command;
use std::sync::atomic::AtomicBool;

use faafo_render::{Engine, JuliaParams, PALETTE, choose_constant, render_png};

fn original_rgb(p: &JuliaParams) -> Vec<u8> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/original_julia.py");
    let output = Command::new("python3")
        .arg(script)
        .args([p.width, p.height, p.iterations].map(|v| v.to_string()))
        // `{:?}` prints the shortest string that parses back to the same f64.
        .args([p.xa, p.xb, p.ya, p.yb, p.cx, p.cy].map(|v| format!("{v:?}")))
        .output()
        .expect("python3 must be installed to run the reference renderer");
    assert!(
        output.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn our_rgb(p: &JuliaParams) -> Vec<u8> {
    let png = render_png(p, Engine::Scalar, &AtomicBool::new(false)).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(png.bytes))
        .read_info()
        .unwrap();
    let info = reader.info();
    assert_eq!(info.color_type, png::ColorType::Indexed);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    assert_eq!(info.palette.as_deref(), Some(&PALETTE[..]));
    let mut indices = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut indices).unwrap();
    indices.truncate(frame.buffer_size());
    indices
        .iter()
        .flat_map(|&k| PALETTE[3 * k as usize..3 * k as usize + 3].to_vec())
        .collect()
}

fn assert_same_as_original(p: JuliaParams) {
    let ours = our_rgb(&p);
    let original = original_rgb(&p);
    assert_eq!(ours.len(), original.len(), "{p:?}");
    if let Some(at) = ours.iter().zip(&original).position(|(a, b)| a != b) {
        let pixel = at / 3;
        panic!(
            "pixel ({}, {}) differs for {p:?}",
            pixel % p.width as usize,
            pixel / p.width as usize
        );
    }
}

#[test]
fn matches_the_original_on_the_classic_constant() {
    assert_same_as_original(JuliaParams {
        width: 64,
        height: 48,
        iterations: 256,
        xa: -1.6,
        xb: 1.6,
        ya: -1.2,
        yb: 1.2,
        cx: -0.8,
        cy: 0.156,
    });
}

#[test]
fn matches_the_original_on_windows_chosen_like_the_original_client() {
    // Windows in the original client's default ranges, c by the original's rule.
    let mut state = 0x5eed_u64;
    let mut next = |lo: f64, hi: f64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((state >> 11) as f64 / (1u64 << 53) as f64)
    };
    for seed in 0..6u64 {
        let (xa, xb, ya, yb) = (
            next(-4.0, -1.0),
            next(1.0, 4.0),
            next(-3.0, -0.5),
            next(0.5, 3.0),
        );
        let iterations = next(128.0, 512.0) as u32;
        let c = choose_constant(xa, xb, ya, yb, iterations, seed);
        let (width, height) = (next(20.0, 70.0) as u32, next(20.0, 70.0) as u32);
        assert_same_as_original(JuliaParams {
            width,
            height,
            iterations,
            xa,
            xb,
            ya,
            yb,
            cx: c.cx,
            cy: c.cy,
        });
    }
}

#[test]
fn matches_the_original_on_single_rows_and_columns_and_one_iteration() {
    let base = JuliaParams {
        width: 1,
        height: 9,
        iterations: 40,
        xa: -1.0,
        xb: 1.0,
        ya: -1.0,
        yb: 1.0,
        cx: 0.285,
        cy: 0.01,
    };
    assert_same_as_original(base);
    assert_same_as_original(JuliaParams {
        width: 9,
        height: 1,
        ..base
    });
    assert_same_as_original(JuliaParams {
        width: 1,
        height: 1,
        ..base
    });
    assert_same_as_original(JuliaParams {
        width: 17,
        height: 5,
        iterations: 1,
        ..base
    });
}

#[test]
fn matches_the_original_where_points_sit_on_the_circle_of_radius_two() {
    // A window whose corners and edges are exactly at |z| = 2 and c = 0: every decision
    // near the boundary goes through the exact fallback.
    assert_same_as_original(JuliaParams {
        width: 41,
        height: 41,
        iterations: 30,
        xa: -2.0,
        xb: 2.0,
        ya: -2.0,
        yb: 2.0,
        cx: 0.0,
        cy: 0.0,
    });
}
