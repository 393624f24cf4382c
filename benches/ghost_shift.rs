//! Throughput of the GhostShift CPU kernel against a plain `copy_from_slice` of the same bytes.
//!
//! Bytes counted = bytes read + bytes written (2 * |Y| * 4 for fp32: every output plane reads
//! one input plane). Run: `cargo bench --bench ghost_shift`. Prints a table; each figure is the
//! median of repeated timed runs (the kernel goes parallel with rayon above 256 KiB).

use std::hint::black_box;
use std::time::{Duration, Instant};

use ghostsr::ops::GhostShiftAttrs;

/// Median seconds per call of `f`, over ~0.4 s of repetitions (after a warm-up).
fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(400) || samples.len() < 10 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    println!(
        "{:<26} {:>10} {:>12} {:>12} {:>12} {:>14} {:>8} {:>10}",
        "case (fp32, N=1)",
        "MiB moved",
        "kernel GB/s",
        "affine GB/s",
        "memcpy GB/s",
        "par copy GB/s",
        "k/copy",
        "k/par copy"
    );
    println!(
        "(kernel and par copy use rayon's {} threads; memcpy is one thread)",
        rayon::current_num_threads()
    );
    for (c, hw) in [(32usize, 256usize), (32, 128), (64, 64)] {
        let dims = [1, c, hw, hw];
        let x: Vec<f32> = (0..c * hw * hw).map(|i| (i % 977) as f32 * 0.01).collect();
        let sources: Vec<i64> = (0..c as i64).map(|g| (g * 7 + 3) % c as i64).collect();
        let shifts: Vec<(i64, i64)> = (0..c as i64).map(|g| (g % 7 - 3, 3 - (g * 3) % 7)).collect();
        let plain =
            GhostShiftAttrs { sources: sources.clone(), shifts: shifts.clone(), scales: None, biases: None };
        let affine = GhostShiftAttrs {
            sources,
            shifts,
            scales: Some((0..c).map(|g| 0.5 + g as f32 * 0.01).collect()),
            biases: Some((0..c).map(|g| g as f32 * 0.001).collect()),
        };
        let mut y = vec![0.0f32; x.len()];
        let bytes = (2 * y.len() * 4) as f64;
        let t_plain = time(|| plain.run(black_box(&x), dims, black_box(&mut y)).expect("run"));
        let t_affine = time(|| affine.run(black_box(&x), dims, black_box(&mut y)).expect("run"));
        let t_copy = time(|| black_box(&mut y).copy_from_slice(black_box(&x)));
        // The same bytes copied plane by plane over the same thread pool as the kernel.
        let plane = hw * hw;
        let t_par = time(|| {
            use rayon::prelude::*;
            black_box(&mut y)
                .par_chunks_mut(plane)
                .zip(black_box(&x).par_chunks(plane))
                .for_each(|(d, s)| d.copy_from_slice(s));
        });
        let gbs = |t: f64| bytes / t / 1e9;
        println!(
            "{:<26} {:>10.1} {:>12.2} {:>12.2} {:>12.2} {:>14.2} {:>8.2} {:>10.2}",
            format!("C_i=C_g={c}, {hw}x{hw}"),
            bytes / (1 << 20) as f64,
            gbs(t_plain),
            gbs(t_affine),
            gbs(t_copy),
            gbs(t_par),
            t_copy / t_plain,
            t_par / t_plain
        );
    }
}
